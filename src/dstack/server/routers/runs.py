from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Response

from dstack.core.models import ArtifactFolders, ArtifactFoldersRequest, Job, JobStatus, Run, RunRequest
from dstack.core.names import MAX_INT64, MAX_JOB_ID, MAX_REPO_ID, MAX_RUN_NAME, MAX_WORKFLOW_NAME
from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx
from dstack.server.services import jobs, runs

router = APIRouter(prefix="/api", tags=["runs"])

RepoId = Query(None, max_length=MAX_REPO_ID)
Ref = Path(max_length=MAX_RUN_NAME)  # a run's name (or a job's id)


@router.post("/runs")
async def run_workflow(req: RunRequest, ctx: Context = Depends(get_ctx)) -> Run:
    return await runs.run_workflow(ctx, req)


@router.post("/artifact-folders")
async def artifact_folders(req: ArtifactFoldersRequest) -> ArtifactFolders:
    """The folders of the project that hold outputs (its workflows' artifacts, its dependencies' mounts): the CLI
    leaves what git does not track in them out of the code it captures."""
    return await runs.artifact_folders(req)


@router.get("/runs")
async def list_runs(response: Response, repo_id: str | None = RepoId,
                    limit: int | None = Query(None, ge=1, le=MAX_INT64),
                    workflow: str | None = Query(None, max_length=MAX_WORKFLOW_NAME),
                    ctx: Context = Depends(get_ctx)) -> list[Run]:
    """The newest runs (all, or `limit`); `X-Total-Count`: how many there are in all (so a listing can say how
    many it leaves out)."""
    found, total = await runs.list_runs(ctx, repo_id, limit, workflow)
    response.headers["X-Total-Count"] = str(total)
    return found


@router.get("/runs/{name}")
async def get_run(name: str = Ref, repo_id: str | None = RepoId, ctx: Context = Depends(get_ctx)) -> Run:
    return await runs.get_run(ctx, repo_id, name)


@router.post("/runs/{name}/reproduce")
async def reproduce(name: str = Ref, repo_id: str | None = RepoId, ctx: Context = Depends(get_ctx)) -> Run:
    return await runs.reproduce(ctx, repo_id, name)


@router.post("/runs/{name}/stop")
async def stop(name: str = Ref, repo_id: str | None = RepoId, abort: bool = False,
               ctx: Context = Depends(get_ctx)) -> Run:
    return await runs.stop(ctx, repo_id, name, abort)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str = Path(max_length=MAX_JOB_ID), ctx: Context = Depends(get_ctx)) -> Job:
    return await runs.get_job(ctx, job_id)


@router.get("/jobs/{job_id}/logs")
async def logs(job_id: str = Path(max_length=MAX_JOB_ID), offset: int = Query(0, ge=0, le=MAX_INT64),
               wait: float = Query(0, ge=0, le=30),
               status: JobStatus | None = None, ctx: Context = Depends(get_ctx)) -> Response:
    """Raw log bytes from `offset`; the next offset and the job's status come in headers, `X-More-Logs: 1`
    when more bytes follow these, its runner (`X-Job-Runner`, and `X-Job-Host-User`: the user that a job
    without an image runs as there) once it has one, and once the job has finished its exit code, reason and
    duration too (so
    that a follower needs no other request). `wait`: seconds to wait for bytes or the end; with `status`
    (the one the caller saw last), also for the job's status to change from it."""
    data, job, more = await jobs.wait_logs(ctx, job_id, offset, wait, status)
    headers = {"X-Next-Offset": str(offset + len(data)), "X-Job-Status": job.status.value}
    if more:
        headers["X-More-Logs"] = "1"
    if job.runner:  # where it runs, and as whom when it runs on the runner's host (it has no image)
        headers["X-Job-Runner"] = job.runner
        if job.runner_resources is not None and job.runner_resources.host_user:
            headers["X-Job-Host-User"] = quote(job.runner_resources.host_user)
    if job.status.finished:
        headers.update(final_headers(job))
    return Response(content=data, media_type="application/octet-stream", headers=headers)


MAX_REASON = 1000  # characters: headers over a few KiB are refused by some proxies


def final_headers(job: Job) -> dict[str, str]:
    """A finished job's outcome as HTTP headers: X-Job-Exit-Code, X-Job-Seconds (from start to end) and
    X-Job-Reason (percent-encoded UTF-8)."""
    headers = {}
    if job.exit_code is not None:
        headers["X-Job-Exit-Code"] = str(job.exit_code)
    if job.started_at and job.finished_at:
        headers["X-Job-Seconds"] = f"{(job.finished_at - job.started_at).total_seconds():.3f}"
    if job.reason:
        headers["X-Job-Reason"] = quote(job.reason[:MAX_REASON])
    return headers
