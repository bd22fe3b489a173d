from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from dstack.core.errors import NotFound
from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx

router = APIRouter(prefix="/api/code", tags=["code"])


@router.head("/{digest}")
async def has(digest: str, ctx: Context = Depends(get_ctx)) -> Response:
    return Response(status_code=200 if ctx.store.has_code(digest) else 404)


@router.put("/{digest}")
async def put(digest: str, request: Request, ctx: Context = Depends(get_ctx)) -> dict:
    try:
        ctx.store.put_code(digest, await request.body())
    except ValueError as e:
        raise NotFound(str(e)) from None
    return {}


@router.get("/{digest}")
async def get(digest: str, ctx: Context = Depends(get_ctx)) -> Response:
    data = ctx.store.get_code(digest)
    if data is None:
        raise NotFound(f"no code archive {digest}")
    return Response(content=data, media_type="application/gzip")
