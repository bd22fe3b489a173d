"""What every router needs: the context and the caller's token."""

from __future__ import annotations

import hmac

from fastapi import Header, Request

from dstack.core.errors import Unauthorized
from dstack.server.context import Context


def get_ctx(request: Request) -> Context:
    return request.app.state.ctx


async def authorized(request: Request, authorization: str | None = Header(None, include_in_schema=False)) -> None:
    ctx: Context = request.app.state.ctx
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), ctx.settings.token.encode()):
        raise Unauthorized("missing or wrong token", hint="check the token in ~/.dstack/config.yml")
