"""`bash`: commands run by bash on the runner's host (or in an image, when one is given)."""

from __future__ import annotations

from pydantic import Field, field_validator

from dstack.providers.base import CommandsProvider, CommandsSpec


class BashSpec(CommandsSpec):
    image: str | None = None
    commands: list[str] = Field(default_factory=list, validate_default=True)

    @field_validator("commands")
    @classmethod
    def _required(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one command is required")
        return v


class BashProvider(CommandsProvider):
    name = "bash"
    Spec = BashSpec
