"""The runner-facing API: register, heartbeat, take a job, report it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from dstack.core.models import (
    Heartbeat,
    HeartbeatReply,
    JobSpec,
    JobUpdate,
    RunnerInfo,
    RunnerRegistration,
)
from dstack.core.names import MAX_JOB_ID, MAX_RUNNER_NAME
from dstack.server.context import Context
from dstack.server.routers.deps import get_ctx
from dstack.server.services import jobs, runners, scheduler

router = APIRouter(prefix="/api/runners", tags=["runners"])

Name = Path(max_length=MAX_RUNNER_NAME)
JobId = Path(max_length=MAX_JOB_ID)


@router.get("")
async def list_runners(all: bool = False, ctx: Context = Depends(get_ctx)) -> list[RunnerInfo]:
    return await runners.list_runners(ctx, include_gone=all)


@router.post("/register")
async def register(reg: RunnerRegistration, ctx: Context = Depends(get_ctx)) -> RunnerInfo:
    return await runners.register(ctx, reg)


@router.post("/{name}/heartbeat")
async def heartbeat(hb: Heartbeat, name: str = Name, ctx: Context = Depends(get_ctx)) -> HeartbeatReply:
    return await runners.heartbeat(ctx, name, hb.job_id, hb.last_taken)


@router.post("/{name}/deregister")
async def deregister(name: str = Name, ctx: Context = Depends(get_ctx)) -> dict:
    await runners.deregister(ctx, name)
    return {}


@router.post("/{name}/take", response_model=None)
async def take(request: Request, name: str = Name, wait: float = Query(0, ge=0, le=60),
               ctx: Context = Depends(get_ctx)) -> JobSpec | Response:
    job = await scheduler.take_job(ctx, name, wait, gone=request.is_disconnected)
    return job if job is not None else Response(status_code=204)


@router.post("/{name}/jobs/{job_id}/status")
async def job_status(upd: JobUpdate, name: str = Name, job_id: str = JobId, ctx: Context = Depends(get_ctx)) -> dict:
    return {"status": await jobs.update_status(ctx, name, job_id, upd)}


@router.post("/{name}/jobs/{job_id}/logs")
async def job_logs(request: Request, name: str = Name, job_id: str = JobId,
                   offset: int | None = Query(None, ge=0, le=2**62), ctx: Context = Depends(get_ctx)) -> dict:
    """Output of the job; `offset`: where it starts in the job's output (so that a batch sent again is not
    appended twice). Only from the runner the job is assigned to, while the job runs."""
    await jobs.append_runner_logs(ctx, name, job_id, await request.body(), offset=offset)
    return {}


@router.get("/store")
async def store(ctx: Context = Depends(get_ctx)) -> dict:
    """Where runners save and read artifacts (S3 credentials come from the runner's own environment)."""
    return ctx.settings.store_config
