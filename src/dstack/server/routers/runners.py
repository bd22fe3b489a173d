"""The runner-facing API (register, heartbeat, take a job, report it: RUNNER_API, for a runner's own token and
for itself only), and the admin's (list runners, issue a runner's token, remove a runner)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from dstack.core.models import (
    Heartbeat,
    HeartbeatReply,
    JobSpec,
    JobUpdate,
    RunnerInfo,
    RunnerRegistration,
    RunnerToken,
    RunnerTokenRequest,
    SpotNotice,
)
from dstack.core.names import MAX_JOB_ID, MAX_RUNNER_NAME
from dstack.core.transfers import StoreAccess
from dstack.server.context import Context
from dstack.server.routers.deps import RUNNER_API, acting_as, caller_runner, get_ctx
from dstack.server.services import jobs, runner_tokens, runners, scheduler, transfers

router = APIRouter(prefix="/api/runners", tags=["runners"])

Name = Path(max_length=MAX_RUNNER_NAME)
JobId = Path(max_length=MAX_JOB_ID)


async def _own(request: Request, name: str = Name) -> str:
    """The runner named in the path, which a runner's token may only be itself: checked before the body is."""
    acting_as(request, name)
    return name


Own = Depends(_own)


@router.get("")
async def list_runners(all: bool = False, ctx: Context = Depends(get_ctx)) -> list[RunnerInfo]:
    return await runners.list_runners(ctx, include_gone=all)


@router.post("/tokens")
async def add_runner(req: RunnerTokenRequest, ctx: Context = Depends(get_ctx)) -> RunnerToken:
    """A token for a self-hosted runner (`dstack runners add`): shown in this answer only."""
    return await runner_tokens.issue(ctx, req.name, req.labels)


@router.post("/{name}/remove")
async def remove_runner(name: str = Name, force: bool = False, ctx: Context = Depends(get_ctx)) -> RunnerInfo | dict:
    """Drain the runner (no new jobs; it goes once its jobs have ended), or with `force` stop its jobs too; its
    token works no more once it has gone. A runner that is not running is removed at once."""
    return await runners.remove(ctx, name, force)


@router.post("/register", tags=[RUNNER_API])
async def register(request: Request, reg: RunnerRegistration, ctx: Context = Depends(get_ctx)) -> RunnerInfo:
    runner = caller_runner(request)
    if runner is not None:  # a runner token names its runner
        acting_as(request, reg.name or runner)
        reg.name = runner
    return await runners.register(ctx, reg)


@router.post("/{name}/heartbeat", tags=[RUNNER_API])
async def heartbeat(hb: Heartbeat, name: str = Own,
                    ctx: Context = Depends(get_ctx)) -> HeartbeatReply:
    job_ids = hb.job_ids or ([hb.job_id] if hb.job_id else [])  # a runner before 0.4 sends its one job
    return await runners.heartbeat(ctx, name, job_ids, hb.last_taken)


@router.post("/{name}/interrupted", tags=[RUNNER_API])
async def interrupted(notice: SpotNotice, name: str = Own, ctx: Context = Depends(get_ctx)) -> dict:
    """The runner's spot machine is being taken back: its jobs are requeued (retry) or end, it takes no more."""
    return {"jobs": await runners.interrupted(ctx, name, notice.action, notice.time)}


@router.post("/{name}/deregister", tags=[RUNNER_API])
async def deregister(name: str = Own, ctx: Context = Depends(get_ctx)) -> dict:
    await runners.deregister(ctx, name)
    return {}


@router.post("/{name}/take", response_model=None, tags=[RUNNER_API])
async def take(request: Request, name: str = Own, wait: float = Query(0, ge=0, le=60),
               port: int | None = Query(None, ge=1024, le=65535), ctx: Context = Depends(get_ctx)) -> JobSpec | Response:
    """`port`: a port free on the runner's machine now, for the master of a multi-node run placed there."""
    job = await scheduler.take_job(ctx, name, wait, gone=request.is_disconnected, port=port)
    return job if job is not None else Response(status_code=204)


@router.post("/{name}/jobs/{job_id}/status", tags=[RUNNER_API])
async def job_status(upd: JobUpdate, name: str = Own, job_id: str = JobId,
                     ctx: Context = Depends(get_ctx)) -> dict:
    return {"status": await jobs.update_status(ctx, name, job_id, upd)}


@router.post("/{name}/jobs/{job_id}/logs", tags=[RUNNER_API])
async def job_logs(request: Request, name: str = Own, job_id: str = JobId,
                   offset: int | None = Query(None, ge=0, le=2**62), ctx: Context = Depends(get_ctx)) -> dict:
    """Output of the job; `offset`: where it starts in the job's output (so that a batch sent again is not
    appended twice). Only from the runner the job is assigned to, while the job runs."""
    await jobs.append_runner_logs(ctx, name, job_id, await request.body(), offset=offset)
    return {}


@router.get("/store", tags=[RUNNER_API])
async def store(ctx: Context = Depends(get_ctx)) -> StoreAccess:
    """How a runner reaches the artifact store: the folder itself on the server's machine, else the transfer API
    (routers/transfers.py; never the store's credentials)."""
    return transfers.store_access(ctx)
