"""`docker`: commands run in a container of the given image (or the image's own command)."""

from __future__ import annotations

from pydantic import field_validator

from dstack.providers.base import CommandsProvider, CommandsSpec


class DockerSpec(CommandsSpec):
    image: str

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not v.strip() or any(c.isspace() for c in v.strip()):
            raise ValueError(f"'{v}' is not an image name")
        return v.strip()


class DockerProvider(CommandsProvider):
    name = "docker"
    Spec = DockerSpec
