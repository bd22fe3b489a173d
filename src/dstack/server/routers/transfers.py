"""A runner's artifact transfers (RUNNER_API, for a runner's own unfinished jobs): blobs and manifests up and
down through the server, or presigned URLs of an S3 store. The rules are in services/transfers.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import FileResponse

from dstack.core.errors import ConfigError
from dstack.core.transfers import (
    MAX_BLOB_SIZE,
    CompleteUpload,
    DownloadRequest,
    DownloadUrls,
    UploadPlans,
    UploadRequest,
)
from dstack.server.context import Context
from dstack.server.routers.deps import RUNNER_API, get_ctx
from dstack.server.routers.runners import JobId, Own
from dstack.server.services import transfers

router = APIRouter(prefix="/api/runners/{name}/jobs/{job_id}", tags=["transfers", RUNNER_API])

Digest = Path(max_length=64)
MAX_MANIFEST = 512 << 20  # bytes of one manifest's JSON (a few million files)


class BlobResponse(FileResponse):
    chunk_size = 4 << 20  # one thread hop per 4 MiB read, not per 64 KiB


@router.post("/uploads")
async def uploads(req: UploadRequest, name: str = Own, job_id: str = JobId,
                  ctx: Context = Depends(get_ctx)) -> UploadPlans:
    """Which of these blobs the store lacks, and how to send each (offset, presigned URL, parts)."""
    return await transfers.plan_uploads(ctx, name, job_id, req)


@router.put("/blobs/{digest}")
async def put_blob(request: Request, name: str = Own, job_id: str = JobId, digest: str = Digest,
                   offset: int = Query(0, ge=0, le=MAX_BLOB_SIZE), size: int = Query(ge=0, le=MAX_BLOB_SIZE),
                   ctx: Context = Depends(get_ctx)) -> dict:
    """Bytes `offset`.. of the blob (`size` in all), streamed to disk and hashed as they arrive."""
    return await transfers.receive_blob(ctx, name, job_id, digest, offset, size, request.stream())


@router.put("/staged/{upload_id}")
async def put_staged(request: Request, name: str = Own, job_id: str = JobId, upload_id: str = Path(max_length=32),
                     offset: int = Query(0, ge=0, le=MAX_BLOB_SIZE), size: int = Query(ge=0, le=MAX_BLOB_SIZE),
                     hold: bool = False, named: str | None = Query(None, alias="hash", max_length=64),
                     ctx: Context = Depends(get_ctx)) -> dict:
    """A blob whose sender hashes it while it sends it. `hold`: kept once all of it is in, until a request names
    its `hash` (stored if the bytes hash to it, else dropped); neither: stored under the hash of what came, which
    the answer says."""
    return await transfers.receive_staged(ctx, name, job_id, upload_id, offset, size, request.stream(), hold, named)


@router.get("/staged/{upload_id}")
async def staged(name: str = Own, job_id: str = JobId, upload_id: str = Path(max_length=32),
                 ctx: Context = Depends(get_ctx)) -> dict:
    """How many bytes of that upload the server holds (where to go on after a cut)."""
    return await transfers.staged_offset(ctx, name, job_id, upload_id)


@router.post("/blobs/{digest}/complete")
async def complete(req: CompleteUpload, name: str = Own, job_id: str = JobId, digest: str = Digest,
                   ctx: Context = Depends(get_ctx)) -> dict:
    """The parts of a multipart upload to S3 are all there: publish the blob."""
    await transfers.complete_parts(ctx, name, job_id, digest, req.upload_id, req.size)
    return {"stored": True}


@router.put("/manifests/{digest}")
async def put_manifest(request: Request, name: str = Own, job_id: str = JobId, digest: str = Digest,
                       ctx: Context = Depends(get_ctx)) -> dict:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_MANIFEST:
            raise ConfigError(f"a manifest is at most {MAX_MANIFEST} bytes")
    await transfers.receive_manifest(ctx, name, job_id, digest, bytes(data))
    return {}


@router.post("/downloads")
async def downloads(req: DownloadRequest, name: str = Own, job_id: str = JobId,
                    ctx: Context = Depends(get_ctx)) -> DownloadUrls:
    """Presigned URLs of these blobs of the job's dependencies (none: GET them from the server)."""
    return await transfers.download_urls(ctx, name, job_id, req.hashes)


@router.get("/blobs/{digest}")
async def get_blob(name: str = Own, job_id: str = JobId, digest: str = Digest,
                   ctx: Context = Depends(get_ctx)) -> FileResponse:
    """A blob of the job's dependencies; Range requests resume a download."""
    return BlobResponse(await transfers.blob_file(ctx, name, job_id, digest), media_type="application/octet-stream")


@router.get("/manifests/{digest}")
async def get_manifest(name: str = Own, job_id: str = JobId, digest: str = Digest,
                       ctx: Context = Depends(get_ctx)) -> Response:
    return Response(await transfers.manifest_json(ctx, name, job_id, digest), media_type="application/json")
