"""What every router needs: the context and who calls.

Two kinds of caller: the admin (the server's own token, which never leaves the server's machine) may call
everything; a runner (a token of its own, services/runner_tokens.py) may call only the routes tagged
RUNNER_API, and on those only for itself (`acting_as`): its own registration, heartbeats and jobs."""

from __future__ import annotations

import hmac

from fastapi import Header, Request

from dstack.core.errors import Forbidden, Unauthorized
from dstack.server.context import Context
from dstack.server.services import runner_tokens

RUNNER_API = "runner-api"  # the tag of the routes a runner's token may call


async def get_ctx(request: Request) -> Context:
    """async, as every dependency here: FastAPI runs a plain `def` one in a worker thread, a hand-off that
    costs more than the function"""
    return request.app.state.ctx


async def authorized(request: Request, authorization: str | None = Header(None, include_in_schema=False)) -> None:
    ctx: Context = request.app.state.ctx
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing token", hint="check the token in ~/.dstack/config.yml")
    if hmac.compare_digest(token.encode(), ctx.settings.token.encode()):
        request.state.runner = None
        return
    runner = await runner_tokens.runner_of(ctx, token)
    if runner is None:
        raise Unauthorized("wrong token", hint="check the token in ~/.dstack/config.yml (a runner: its --token)")
    route = request.scope.get("route")
    if RUNNER_API not in (getattr(route, "tags", None) or ()):
        raise Forbidden(f"a runner's token (runner {runner}) cannot call {request.method} {request.url.path}",
                        hint="use the admin's token (DSTACK_HOME/server/token on the server's machine)")
    request.state.runner = runner


def caller_runner(request: Request) -> str | None:
    """The runner that calls, or None for the admin."""
    return getattr(request.state, "runner", None)


def acting_as(request: Request, name: str) -> None:
    """A runner acts only for itself."""
    runner = caller_runner(request)
    if runner is not None and runner != name:
        raise Forbidden(f"runner {runner}'s token cannot act for runner {name}")
