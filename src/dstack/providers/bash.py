"""`bash`: commands run by bash on the runner's host (or in an image, when one is given)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from dstack.core.models import JobSpec
from dstack.providers.base import CommandsProvider, CommandsSpec, relative_path
from dstack.providers.python import python_command, python_version, venv_lines


class BashSpec(CommandsSpec):
    image: str | None = None
    commands: list[str] = Field(default_factory=list, validate_default=True)
    python: str | None = Field(None, description="Run the commands in a venv of this Python version, e.g. 3.11 "
                                                 "(2022); with `requirements`, python3 by default.")
    requirements: str | None = Field(None, description="A pip requirements file, installed into the job's venv "
                                                       "before the commands (2022).")

    @field_validator("commands")
    @classmethod
    def _required(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one command is required")
        return v

    @field_validator("python", mode="before")
    @classmethod
    def _python(cls, v: Any) -> Any:
        return python_version(v)

    @field_validator("requirements", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return None if v is None else relative_path(str(v), "requirements")


class BashProvider(CommandsProvider):
    name = "bash"
    Spec = BashSpec

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        """With the 2022 `python` or `requirements`, the commands run in a venv of the job's own (made with
        `python<version>`, the requirements installed there), as the `python` provider's do."""
        if spec.python or spec.requirements:
            venv = venv_lines(python_command(spec.python), spec.requirements)
            spec = spec.model_copy(update={"before_run": [*venv, *spec.before_run]})
        return super().create_jobs(spec, env)
