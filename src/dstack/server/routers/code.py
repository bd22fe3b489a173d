from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx

router = APIRouter(prefix="/api/code", tags=["code"])


@router.head("/{digest}")
async def has(digest: str, ctx: Context = Depends(get_ctx)) -> Response:
    return Response(status_code=200 if ctx.code.has(digest) else 404)


@router.put("/{digest}")
async def put(digest: str, request: Request, ctx: Context = Depends(get_ctx)) -> dict:
    ctx.code.put(digest, await request.body())
    return {}


@router.get("/{digest}")
async def get(digest: str, ctx: Context = Depends(get_ctx)) -> Response:
    return Response(content=ctx.code.get(digest), media_type="application/octet-stream")
