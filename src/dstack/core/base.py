"""The base of dstack's models: validators are built on first use, not at import, so that a CLI
command pays only for the models it touches."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(defer_build=True)


class Body(Model):
    """A model the server takes as a request body: built when it is defined, not deferred. FastAPI validates
    a body through a TypeAdapter of its own, made at start-up where FastAPI keeps back pydantic's warning that
    the parameter's alias does nothing there; a deferred model would build that adapter on the first request,
    outside that guard, and the warning would reach server.log."""

    model_config = ConfigDict(defer_build=False)
