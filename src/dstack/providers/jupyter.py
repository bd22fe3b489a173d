"""`lab` and `notebook`: JupyterLab or the Jupyter Notebook in a job (the 2022 providers), protected by a token of
the run's own, its URL printed once it answers.

The job makes a virtual environment of its own (with `python<version>`, as the `python` provider does), installs
the workflow's `requirements` and JupyterLab (or Notebook) from the package index there, and serves on the job's
first port (`PORT_0`) on every address of the runner's machine. The token (`JUPYTER_TOKEN`, which Jupyter reads) is
made by the job, never written in its spec (which the API shows) nor on a command line; the job prints `http://<host>:<port>/lab?token=<token>` when the server answers. `dstack stop`
ends it."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from dstack.core.models import JobSpec
from dstack.providers.base import CommandsProvider, CommandsSpec, relative_path
from dstack.providers.ide import announcer, secret
from dstack.providers.python import PIP, _without_commands, python_command, python_version, venv_lines


class JupyterSpec(CommandsSpec):
    """JupyterLab (`lab`) or the Jupyter Notebook (`notebook`), with the workflow's `requirements` and Python
    `version` (2022: `python`), `before_run`/`setup`, `environment`, `artifacts` and `resources`."""

    model_config = ConfigDict(json_schema_extra=_without_commands)

    requirements: str | None = Field(None, description="A pip requirements file, installed before the IDE.")
    version: str | None = Field(None, validation_alias=AliasChoices("version", "python"),
                                description="The Python version, e.g. 3.11 (2022: `python`); default: python3.")
    image: str | None = Field(None, description="Run in this image (it needs Python and pip) instead of on the "
                                                "runner's host.")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return python_version(v)

    @model_validator(mode="after")
    def _ide_commands(self) -> JupyterSpec:
        if self.commands:
            raise ValueError(f"the {self.provider or 'lab'} provider runs the IDE: commands to run first go in "
                             "`before_run`")
        return self

    @field_validator("requirements", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return None if v is None else relative_path(str(v), "requirements")


class _Jupyter(CommandsProvider):
    Spec = JupyterSpec
    package: str
    command: str
    path: str
    title: str

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        lines = venv_lines(python_command(spec.version), spec.requirements, upgrade_pip=True)
        lines += [f"{PIP} {self.package}",
                  secret("JUPYTER_TOKEN"),
                  announcer("JUPYTER_TOKEN", f"http://127.0.0.1:{{port}}{self.path}?token={{secret}}",
                            f"\n{self.title} is ready: http://{{host}}:{{port}}{self.path}?token={{secret}}\n"),
                  f'exec {self.command} --no-browser --ip=0.0.0.0 --port="$PORT_0" --ServerApp.allow_root=True '
                  f"--ServerApp.open_browser=False"]
        return super().create_jobs(spec.model_copy(update={"commands": lines, "ports": max(spec.ports, 1)}), env)


class LabProvider(_Jupyter):
    name = "lab"
    package = "jupyterlab"
    command = "jupyter lab"
    path = "/lab"
    title = "JupyterLab"


class NotebookProvider(_Jupyter):
    name = "notebook"
    package = "notebook"
    command = "jupyter notebook"
    path = "/tree"
    title = "Jupyter Notebook"
