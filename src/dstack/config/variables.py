"""`.dstack/variables.yaml`, command-line overrides, and `$name` / `${{ name }}` substitution."""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any

from dstack.config.files import ProjectFiles
from dstack.config.yaml_positions import Located, load_text
from dstack.core.errors import ConfigError, did_you_mean

VARIABLES_FILE = ".dstack/variables.yaml"
SYSTEM_VARIABLES = ("run_name", "job_id", "variables_as_args", "run_args")
# fields whose text is given to a shell: an undefined `$NAME` there is the shell's, not ours
SHELL_FIELDS = {"commands", "before_run", "setup", "environment", "env"}

_REF = re.compile(r"\$\$|\$\{\{\s*([A-Za-z_][\w.-]*)\s*\}\}|\$\{\{[^}]*\}\}|\$([A-Za-z_]\w*)")
_ALIASES = {"run.name": "run_name", "job.id": "job_id", "run.args": "run_args"}


def load_variables(files: ProjectFiles, workflow: str, workflow_names: list[str]) -> tuple[dict, Located | None]:
    """The variables declared for `workflow`: `global` merged with its own section."""
    text = files.texts.get(VARIABLES_FILE)
    if text is None:
        return {}, None
    located = load_text(text, VARIABLES_FILE)
    data = located.data
    if data is None:
        return {}, located
    if not isinstance(data, dict):
        raise located.error((), "variables.yaml must be a mapping with the key 'variables'")
    unknown = [k for k in data if k != "variables"]
    if unknown:
        raise located.error(
            (unknown[0],), f"unknown key '{unknown[0]}'", hint=did_you_mean(str(unknown[0]), ["variables"]) or
            "the file has one key, 'variables'", key=True,
        )
    sections = data.get("variables") or {}
    if not isinstance(sections, dict):
        raise located.error(("variables",), "'variables' must be a mapping: 'global' and one section per workflow")
    for name, section in sections.items():
        if section is not None and not isinstance(section, dict):
            raise located.error(("variables", name), f"variables of '{name}' must be a mapping of name: value")
        if name != "global" and name not in workflow_names:
            raise located.error(
                ("variables", name), f"variables for an unknown workflow '{name}'",
                hint=did_you_mean(str(name), ["global", *workflow_names]) or
                f"workflows: {', '.join(workflow_names) or 'none'}", key=True,
            )
    merged = dict(sections.get("global") or {})
    merged.update(sections.get(workflow) or {})
    return merged, located


@dataclass
class Declared:
    """A variable of variables.yaml as a workflow sees it: its value, the section it comes from (`global` or the
    workflow's own), and where it is written (line, column)."""

    value: Any
    section: str
    at: tuple[int | None, int | None]


def declared_variables(files: ProjectFiles, workflow: str, workflow_names: list[str]) -> dict[str, Declared]:
    """What `load_variables` gives `workflow`, with where each value comes from."""
    merged, located = load_variables(files, workflow, workflow_names)
    if not merged:
        return {}
    sections = located.data["variables"]
    out = {}
    for name, value in merged.items():
        section = workflow if name in (sections.get(workflow) or {}) else "global"
        out[name] = Declared(value, section, located.where(("variables", section, name), key=True))
    return out


def parse_cli_value(text: str) -> Any:
    """`--gpu 4` gives the integer 4, `--lr 0.01` a float, `--flag true` a bool, anything else a string.
    A number is a number only when it reads back as written: `--version 3.10` stays '3.10' (not 3.1),
    `--seed 007` stays '007'; and unlike YAML 1.1, `yes` is not true and `12:30` is not 750."""
    s = text.strip()
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for kind in (int, float):
        try:
            number = kind(s)
        except ValueError:
            continue
        if math.isfinite(number) and repr(number) == s:
            return number
    return text


class _NoValue:
    """`--gpu` without a value: an error once `apply_overrides` knows whether `gpu` is a variable at all."""

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()


def parse_cli_args(args: list[str]) -> dict[str, Any]:
    """`--gpu 4 --name=x` -> {'gpu': 4, 'name': 'x'}; `--gpu` alone -> {'gpu': NO_VALUE}."""
    return _overrides(args, None)[0]


def split_cli_args(args: list[str], wants_run_args: bool, variables: list[str]) -> tuple[dict[str, Any], str]:
    """The command line after `dstack run WORKFLOW`: (overrides, run args). A workflow that refers to
    `${{ run.args }}` gets, as that text, every argument that does not set one of `variables` (the 2022 form:
    `dstack run train --epochs 3` with `python train.py ${{ run.args }}`); any other takes `--NAME VALUE` only."""
    if not wants_run_args:
        return parse_cli_args(args), ""
    overrides, rest = _overrides(args, set(variables) | {v.replace("_", "-") for v in variables})
    return overrides, shlex.join(rest)


def _overrides(args: list[str], known: set[str] | None) -> tuple[dict[str, Any], list[str]]:
    """(`--NAME VALUE` / `--NAME=VALUE` pairs, the other arguments). `known`: the names that are variables, the
    others kept as they are (a leading `--` dropped); None: every argument must be a variable's."""
    out: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") and arg != "--" else ("", "", "")
        if known is not None and name not in known:
            if arg != "--" or rest:
                rest.append(arg)
            i += 1
            continue
        if not name:
            raise ConfigError(f"unexpected argument '{arg}'",
                              hint="variables are given as --NAME VALUE, e.g. dstack run train --gpu 2")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                out[name] = NO_VALUE
                i += 1
                continue
            value = args[i + 1]
            i += 1
        out[name] = parse_cli_value(value)
        i += 1
    return out, rest


def apply_overrides(declared: dict, overrides: dict, workflow: str, required: tuple[str, ...] = ()) -> dict:
    """`declared` with the command line's `overrides`; an override must name a declared variable, or one of
    `required`: those the workflow refers to that no file declares (see `references`)."""
    merged = dict(declared)
    required = tuple(n for n in required if n not in declared)
    known = [*declared, *required]
    for name, value in overrides.items():
        key = name if name in known else name.replace("-", "_")
        if key not in known:
            names = ", ".join(f"--{n}" for n in declared) or "none"
            hint = f"declared variables: {names}" + ("" if known else " (declare them in .dstack/variables.yaml)")
            if required:
                hint += f"; needed by the workflow, declared nowhere: {', '.join(f'--{n}' for n in required)}"
            hint += f" (`dstack run {workflow} --help` lists them)"
            suggestion = did_you_mean(name, known)
            raise ConfigError(f"'{workflow}' has no variable '{name}'",
                              hint=f"{suggestion} {hint}" if suggestion else hint)
        if value is NO_VALUE:
            raise ConfigError(f"--{name} needs a value", hint=f"write it as --{name} VALUE")
        merged[key] = value
    return merged


def as_env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return "" if value is None else str(value)


def variables_as_args(variables: dict) -> str:
    """All variables as `--name value`, each value quoted for the shell that runs the commands."""
    return " ".join(f"--{k} {shlex.quote(as_env_value(v))}" for k, v in variables.items())


def substitute(value: Any, variables: dict, located: Located, path: tuple, shell: bool = False,
               used: dict[tuple, str] | None = None) -> Any:
    """Replace references in every string of `value`. A string that is exactly one reference takes the
    variable's own YAML type (`gpu: $gpu` with 4 gives 4). `used` collects path -> variable name for
    the values that came from a variable (for error messages)."""
    if isinstance(value, dict):
        return {k: substitute(v, variables, located, path + (k,), _shell(shell, path, k), used)
                for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables, located, path + (i,), shell, used) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def lookup(match: re.Match) -> tuple[bool, Any]:
        if match.group(0) == "$$":
            return True, "$$" if shell else "$"  # in a command, `$$` is the shell's PID
        name = match.group(1) or match.group(2)
        if name is None:
            raise located.error(path, f"cannot read the reference '{match.group(0)}'",
                                hint="write ${{ name }} with a variable name inside")
        name = _ALIASES.get(name, name)
        if name in variables:
            return True, variables[name]
        if shell and match.group(2):
            return False, match.group(0)  # `$HOME` in a command is the shell's
        hint = (f"declare it in .dstack/variables.yaml (under 'global' or the workflow's section)"
                f" or pass it as --{name} VALUE")
        suggestion = did_you_mean(name, variables)
        raise located.error(path, f"undefined variable '{name}'", hint=f"{suggestion} {hint}" if suggestion else hint)

    whole = _REF.fullmatch(value.strip())
    if whole and whole.group(0) != "$$":
        found, v = lookup(whole)
        if found and used is not None:
            used[path] = _ALIASES.get(whole.group(1) or whole.group(2), whole.group(1) or whole.group(2))
        return v if found else value
    return _REF.sub(lambda m: as_env_value(lookup(m)[1]), value)


def _shell(shell: bool, path: tuple, key: Any) -> bool:
    """Whether the value under `key` (of the value at `path`; a workflow is at ('workflows', i)) is text for a
    shell: there an undefined `$NAME` is the shell's."""
    return shell or (len(path) == 2 and key in SHELL_FIELDS)


@dataclass
class Reference:
    """`$name` or `${{ name }}` in a workflow. `required`: undefined, it is an error (not the shell's `$NAME`)."""

    name: str
    path: tuple
    required: bool


def references(value: Any, path: tuple, shell: bool = False) -> list[Reference]:
    """The variables that `value` (at `path`) refers to, in the order written, read as `substitute` reads them;
    system variables (`run_name`, `job_id`, `variables_as_args`) left out."""
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in references(v, path + (k,), _shell(shell, path, k))]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in references(v, path + (i,), shell)]
    if not isinstance(value, str) or "$" not in value:
        return []
    found = []
    for m in _REF.finditer(value):
        name = m.group(1) or m.group(2)
        name = _ALIASES.get(name, name)
        if name and name not in SYSTEM_VARIABLES:
            found.append(Reference(name, path, required=not (shell and m.group(2))))
    return found
