from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse

from dstack.server.context import Context
from dstack.server.routers.deps import RUNNER_API, caller_runner, get_ctx
from dstack.server.services import jobs

router = APIRouter(prefix="/api/code", tags=["code"])


@router.head("/{digest}")
async def has(digest: str, ctx: Context = Depends(get_ctx)) -> Response:
    return Response(status_code=200 if ctx.code.has(digest) else 404)


@router.put("/{digest}")
async def put(digest: str, request: Request, ctx: Context = Depends(get_ctx)) -> dict:
    """The blob's bytes are the body, streamed to disk as they arrive."""
    await ctx.code.put(digest, request.stream())
    return {}


@router.get("/{digest}", tags=[RUNNER_API])
async def get(request: Request, digest: str, ctx: Context = Depends(get_ctx)) -> FileResponse:
    """A code blob; a runner gets only the code of its own unfinished jobs."""
    runner = caller_runner(request)
    if runner is not None:
        await jobs.runner_may_read_code(ctx, runner, digest)
    return FileResponse(ctx.code.file(digest), media_type="application/octet-stream")
