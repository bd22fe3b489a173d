from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import FileResponse

from dstack.core.names import MAX_REPO_ID, MAX_RUN_NAME
from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx
from dstack.server.services import artifacts

router = APIRouter(prefix="/api", tags=["artifacts"])


@router.get("/runs/{ref}/artifacts")
async def list_artifacts(ref: str = Path(max_length=MAX_RUN_NAME), repo_id: str | None = Query(None, max_length=MAX_REPO_ID),
                         ctx: Context = Depends(get_ctx)) -> list[dict]:
    return await artifacts.list_artifacts(ctx, repo_id, ref)


@router.get("/manifests/{digest}")
async def manifest(digest: str, ctx: Context = Depends(get_ctx)) -> Response:
    return Response(content=await artifacts.manifest_json(ctx, digest), media_type="application/json")


@router.get("/blobs/{digest}")
async def blob(digest: str, ctx: Context = Depends(get_ctx)) -> FileResponse:
    """A blob's bytes; Range requests resume a download."""
    return FileResponse(await artifacts.blob_file(ctx, digest), media_type="application/octet-stream")


@router.post("/prune")
async def prune(repo_id: str = Query(max_length=MAX_REPO_ID), dry_run: bool = False, ctx: Context = Depends(get_ctx)) -> dict:
    return await artifacts.prune(ctx, repo_id, dry_run)
