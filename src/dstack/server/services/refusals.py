"""A workflow that asks for what no runner and no backend has: the refusal points at where the workflow asks
for it (file:line:column), names the variable that set the value, and says what would fit."""

from __future__ import annotations

import re

from dstack.config.workflows import ResolvedWorkflow
from dstack.core.errors import Unsatisfiable
from dstack.core.resources import format_mib

ADD_RUNNER = "add a runner that has it: `dstack-runner start --server URL --token TOKEN` on such a machine"


def located(e: Unsatisfiable, resolved: ResolvedWorkflow) -> Unsatisfiable:
    fixes: list[str] = []
    where = None
    for what, most in e.most.items():
        if what == "gpu.name" and not most and e.most.get("gpu") == 0:
            continue  # no GPU at all: asking for none is the fix, whatever the model
        if what == "gpu" and e.most.get("gpu.name"):
            continue  # GPUs of other models: asking for one of those is the fix, not asking for none
        place, variable, key = resolved.resource_source(what)
        where = where or place
        fixes.append(_fix(resolved, what, most, variable, key))
    if "labels" in e.lacking:
        entry = resolved.entry
        where = where or entry.located.error(entry.path + ("resources", "labels"), "")
        fixes.append("start a runner with those labels (`dstack runners add --labels KEY=VALUE`, then "
                     "`dstack-runner start` with its token), or change `labels`")
    if "docker" in e.lacking:
        entry = resolved.entry
        where = where or entry.located.error(entry.path + ("image",), "")
        fixes.append("drop `image` to run the commands on the host, or start Docker on a runner's machine")
    if "nodes" in e.lacking:
        entry = resolved.entry
        where = where or entry.located.error(entry.path + ("nodes",), "")
    if where is None:  # nothing to point at but the workflow's resources
        where = resolved.entry.located.error(resolved.entry.path + ("resources",), "")
    hint = f"{'; '.join(fixes)}; or {ADD_RUNNER}" if fixes else e.hint
    return Unsatisfiable(e.message, hint=hint, most=e.most, lacking=e.lacking, file=where.file, line=where.line,
                         column=where.column)


def _fix(resolved: ResolvedWorkflow, what: str, most, variable: str | None, key: str) -> str:
    if what == "gpu.name":
        if not most:
            return "no runner here has a GPU"
        short = _short_name(most[0])
        return f"the GPUs there are {', '.join(most)}: ask for one of them (e.g. `{short}/gpu: 1`)"
    value = format_mib(most) if what in ("memory", "gpu.memory") else str(most)
    if variable is not None:
        typed = resolved.overrides.get(variable)
        asked = f"--{variable} {typed} asks for more than any runner has; " if typed is not None else ""
        return (f"{asked}`dstack run {resolved.name} --{variable} {value}` fits (`{key}` takes its value from "
                f"the variable '{variable}')")
    parent, _, last = key.rpartition(".")
    return f"`{last}: {value}` under `{parent}` fits" if parent else f"`{key}: {value}` fits"


def _short_name(model: str) -> str:
    """`NVIDIA A100-SXM4-80GB` -> `a100`: the part of a GPU's model name that `<name>/gpu` matches on."""
    words = [w for w in re.split(r"[\s-]+", model) if w and w.upper() not in ("NVIDIA", "TESLA", "GEFORCE", "AMD")]
    return (words[0] if words else model).lower()
