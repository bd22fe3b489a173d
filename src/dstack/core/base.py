"""The base of dstack's models: validators are built on first use, not at import, so that a CLI
command pays only for the models it touches."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(defer_build=True)
