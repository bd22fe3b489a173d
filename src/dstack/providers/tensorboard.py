"""`tensorboard`: TensorBoard over the artifacts of other runs (`runs: [train-run-1, train:best]`), the 2022
provider.

Each run's artifacts are mounted (read-only, as dependencies) under `runs/<run>` of the job's folder, so that two
runs that both saved `logs` sit side by side, and TensorBoard shows each as a run of its own. `logdir` narrows it to
a folder inside each run's artifacts. TensorBoard is installed from the package index into the job's own venv.
TensorBoard has no authentication of its own: it listens on 127.0.0.1 only, and a small proxy of the job's
(providers/token_proxy.py) serves it on the job's port, on every address, to requests that carry the run's token
(made in the job, printed in its log with the URL once TensorBoard answers)."""

from __future__ import annotations

import posixpath
import shlex
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from dstack.core.models import JobSpec
from dstack.providers.base import CommandsProvider, CommandsSpec, artifact_path, relative_path
from dstack.providers.ide import secret
from dstack.providers.python import PIP, VENV, _without_commands, python_command, python_version, venv_lines

RUNS = "runs"  # the folder of the job's working dir where each run's artifacts are mounted
_PROXY = Path(__file__).with_name("token_proxy.py")


class TensorboardSpec(CommandsSpec):
    """TensorBoard over the artifacts of `runs` (run names, `workflow:tag` or a workflow's latest DONE run)."""

    model_config = ConfigDict(json_schema_extra=_without_commands)

    runs: list[str] = Field(description="The runs whose artifacts hold TensorBoard logs: run names, `workflow:tag`, "
                                        "or a workflow (its latest DONE run).", min_length=1)
    logdir: str | None = Field(None, description="The folder of each run's artifacts to read (e.g. `logs`, or an "
                                                 "absolute artifact's path); default: all of them.")
    version: str | None = Field(None, validation_alias=AliasChoices("version", "python"),
                                description="The Python version, e.g. 3.11 (2022: `python`); default: python3.")
    requirements: str | None = Field(None, description="A pip requirements file (e.g. TensorBoard plugins), "
                                                       "installed with TensorBoard.")
    image: str | None = Field(None, description="Run in this image (it needs Python and pip) instead of on the "
                                                "runner's host.")

    @field_validator("runs", mode="before")
    @classmethod
    def _runs(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list) and not v:
            raise ValueError("`runs` names no run: list the runs whose logs to show, e.g. runs: [train:latest]")
        if isinstance(v, list):
            for run in v:
                if not isinstance(run, str) or not run.strip() or "/" in run or run.strip().startswith("."):
                    raise ValueError(f"'{run}' is not a run: write a run name, workflow:tag or a workflow")
            v = [run.strip() for run in v]
            twice = [run for run in v if v.count(run) > 1]
            if twice:
                raise ValueError(f"run '{twice[0]}' is listed twice")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return python_version(v)

    @field_validator("logdir", "requirements", mode="before")
    @classmethod
    def _path(cls, v: Any, info) -> Any:
        if info.field_name == "logdir" and isinstance(v, str) and v.strip().startswith("/"):
            v = artifact_path(v, "logdir").lstrip("/")  # in an absolute artifact (/opt/tb: runs/<run>/opt/tb)
        return None if v is None else relative_path(str(v), info.field_name)

    @model_validator(mode="after")
    def _served(self) -> TensorboardSpec:
        if self.commands:
            raise ValueError("the tensorboard provider runs TensorBoard: commands to run first go in `before_run`")
        self.dependencies = [*self.dependencies, *({"ref": run, "into": _folder(run)} for run in self.runs)]
        return self


def _folder(run: str) -> str:
    """`runs/<run>`; `train:best` is `runs/train@best` (no run name has `@`), `:best` is `runs/@best`."""
    return posixpath.join(RUNS, run.replace(":", "@"))


class TensorboardProvider(CommandsProvider):
    name = "tensorboard"
    Spec = TensorboardSpec

    def own_args(self, parser) -> None:
        parser.add_argument("runs", nargs="+")
        parser.add_argument("--logdir")

    def own_keys(self, known) -> dict[str, Any]:
        return {"runs": known.runs, **({"logdir": known.logdir} if known.logdir else {})}

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        logdirs = ",".join(f"{posixpath.basename(_folder(r))}:{posixpath.join(_folder(r), spec.logdir or '')}"
                           .rstrip("/") for r in spec.runs)
        # a run whose artifacts lack `logdir` shows nothing: said, not left for the user to wonder
        checks = [f"[ -e {shlex.quote(posixpath.join(_folder(r), spec.logdir))} ] || echo \"dstack: run {r} saved no "
                  f"'{spec.logdir}' (its artifacts: $(cd {shlex.quote(_folder(r))} && ls -A | tr '\\n' ' '))\" >&2"
                  for r in spec.runs] if spec.logdir else []
        lines = [*checks, *venv_lines(python_command(spec.version), upgrade_pip=True),
                 f"{PIP} tensorboard" + (f" -r {shlex.quote(spec.requirements)}" if spec.requirements else ""),
                 f"cat > {VENV}/token_proxy.py <<'DSTACK_PROXY_END'\n{_PROXY.read_text()}DSTACK_PROXY_END",
                 secret("DSTACK_APP_TOKEN"),
                 "APP_PORT=\"$(python -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); "
                 "print(s.getsockname()[1])')\"",
                 f"env -u DSTACK_APP_TOKEN tensorboard --logdir_spec {shlex.quote(logdirs)} --host 127.0.0.1 "
                 "--port \"$APP_PORT\" &",
                 f"exec python {VENV}/token_proxy.py \"$PORT_0\" \"$APP_PORT\" \"$!\" TensorBoard"]
        return super().create_jobs(spec.model_copy(update={"commands": lines, "ports": max(spec.ports, 1)}), env)
