"""`python`: a Python script with its arguments, its requirements and the Python version it needs (the 2022 provider).

On the runner's host it runs with `python<version>` (`python3` when no version is given), which must be installed
there (else the job fails naming the version); with `docker: true` in the image `python:<version>`, or in the
workflow's `image`. A requirements file is installed into a virtual environment of the job's own (the host's
Python is never changed), from whatever index or wheel folder the file names (`--find-links`, `--no-index`)."""

from __future__ import annotations

import re
import shlex
from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from dstack.core.models import JobSpec
from dstack.providers.base import CommandsProvider, CommandsSpec, relative_path

VENV = ".dstack-venv"  # in the job's working folder: the job's own, gone with it
PIP = "python -m pip install --disable-pip-version-check -q"  # in the venv


def python_command(version: str | None) -> str:
    """The Python of a workflow's `version` (`python3.11`), or the machine's python3."""
    return f"python{version}" if version else "python3"


def venv_lines(python: str, requirements: str | None = None, *, upgrade_pip: bool = False) -> list[str]:
    """Lines of a job's script: a venv of the job's own made with `python` and activated (its `python` and `pip`
    first on PATH for what follows), then `requirements` installed in it."""
    lines = [f"{python} -m venv {VENV} && . {VENV}/bin/activate"]
    if upgrade_pip:
        lines.append(f"{PIP} --upgrade pip > /dev/null || true")
    if requirements:
        lines.append(f"{PIP} -r {shlex.quote(requirements)}")
    return lines


def python_version(v: Any) -> str | None:
    """`3.10` is the number 3.1 in YAML: the 2022 providers read it as 3.10, and so do these."""
    if v is None:
        return None
    if isinstance(v, float):
        v = "3.10" if v == 3.1 else repr(v)
    v = str(v).strip()
    if not re.fullmatch(r"3(\.\d{1,2})?", v):
        raise ValueError(f"'{v}' is not a Python version: write e.g. \"3.11\" (quoted: 3.10 unquoted is 3.1)")
    return v


def _without_commands(schema: dict) -> None:
    schema.get("properties", {}).pop("commands", None)  # it runs `file`: `commands` is refused


class PythonSpec(CommandsSpec):
    """A Python script: `file` (2022: `script`, `python_script`), its `args`, a `requirements` file, the Python
    `version` (2022: `python`), and what every workflow has (`environment`, `before_run`, `artifacts`,
    `resources`, ...)."""

    model_config = ConfigDict(json_schema_extra=_without_commands)

    file: str = Field(validation_alias=AliasChoices("file", "script", "python_script"),
                      description="The script to run, relative to working_dir (2022: `script`, `python_script`).")
    args: list[str] = Field(default_factory=list,
                            description="Its arguments: a list, or one string of shell words (`--epochs 3`).")
    requirements: str | None = Field(None, description="A pip requirements file, installed into the job's own venv.")
    version: str | None = Field(None, validation_alias=AliasChoices("version", "python"),
                                description="The Python version, e.g. 3.10 (2022: `python`); default: python3.")
    image: str | None = Field(None, description="Run in this image instead of on the runner's host.")
    docker: bool = Field(False, description="Run in the image python:VERSION (a registry must be reachable).")

    @field_validator("file", "requirements", mode="before")
    @classmethod
    def _path(cls, v: Any, info) -> Any:
        return None if v is None else relative_path(str(v), info.field_name)

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):  # shell words: `--epochs 3 ${{ run.args }}`
            try:
                return shlex.split(v)
            except ValueError as e:
                raise ValueError(f"args {v!r}: {e} (a quote not closed?)") from None
        if isinstance(v, list):
            return [str(x).lower() if isinstance(x, bool) else str(x) for x in v]
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return python_version(v)

    @model_validator(mode="after")
    def _no_commands(self) -> PythonSpec:
        if self.commands:
            raise ValueError("the python provider runs `file`; commands to run before it go in `before_run` "
                             "(or use `provider: bash`)")
        if self.docker and self.image:
            raise ValueError("give `image` or `docker: true` (the image python:VERSION), not both")
        return self


class PythonProvider(CommandsProvider):
    name = "python"
    Spec = PythonSpec

    def own_args(self, parser) -> None:
        """`dstack run python FILE [ARGS]` (2022): everything after FILE is the script's."""
        import argparse

        parser.add_argument("--version", "--python", dest="version")
        parser.add_argument("file", nargs="?")
        parser.add_argument("args", nargs=argparse.REMAINDER)

    def own_keys(self, known) -> dict[str, Any]:
        if not known.file:
            from dstack.core.errors import ConfigError

            raise ConfigError(f"`dstack run {self.name}` needs the script to run",
                              hint=f"dstack run {self.name} FILE [ARGS], e.g. `dstack run {self.name} train.py --epochs 3`")
        out: dict[str, Any] = {"file": known.file, "args": known.args}
        if known.version:
            out["version"] = known.version
        return out

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        if spec.docker:
            image, python = f"python:{spec.version or '3'}", "python"
        else:
            image, python = spec.image, python_command(spec.version)
        lines = []
        if not spec.docker:
            where = f"in the image {image}" if image else "on this runner's host ($(hostname))"
            lines.append(f"command -v {python} > /dev/null || {{ echo \"{python} is not installed {where}: install "
                         f"Python {spec.version or '3'} there, or give the workflow 'docker: true' (the image "
                         f"python:{spec.version or '3'})\" >&2; exit 127; }}")
        if spec.requirements:
            lines += venv_lines(python, spec.requirements)
            python = "python"
        lines.append(" ".join([python, shlex.quote(spec.file), *(shlex.quote(a) for a in spec.args)]))
        jobs = super().create_jobs(spec.model_copy(update={"commands": lines}), env)
        for job in jobs:
            job.image = image
        return jobs
