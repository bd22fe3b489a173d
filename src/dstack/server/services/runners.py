"""Runners: registration, heartbeats, and what happens to the jobs of a runner that goes silent."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from dstack.core.errors import Conflict, NotFound
from dstack.core.models import (
    FINISHED,
    HeartbeatReply,
    JobStatus,
    RunnerInfo,
    RunnerRegistration,
    RunnerStatus,
)
from dstack.core.names import random_base
from dstack.server.context import Context
from dstack.server.db.tables import JobRow, RunnerRow
from dstack.server.services.convert import runner_model
from dstack.server.services.run_state import now, refresh_run_status


async def new_name(s, exclude: set[str] = frozenset()) -> str:
    """`adjective-animal-N`, not used by any runner yet."""
    base = random_base()
    n = 1
    while await s.get(RunnerRow, f"{base}-{n}") or f"{base}-{n}" in exclude:
        n += 1
    return f"{base}-{n}"


async def register(ctx: Context, reg: RunnerRegistration) -> RunnerInfo:
    """A runner joins (or a restarted one joins again) under its name, READY. The name of a runner that runs a
    job and is alive (heard from within the timeout) is refused: a second runner would take over its job."""
    async with ctx.sessions() as s:
        name = reg.name or await new_name(s)
        row = await s.get(RunnerRow, name)
        t = now()
        timeout = ctx.settings.runner_timeout
        if (row is not None and row.status == RunnerStatus.BUSY.value and row.job_id
                and (t - row.last_seen_at).total_seconds() < timeout):
            raise Conflict(f"runner {name} is registered already and runs job {row.job_id}",
                           hint=f"start this runner with another --name; if that runner is gone, the server gives "
                                f"it up {timeout:g} s after its last heartbeat")
        if row is None:
            row = RunnerRow(name=name, registered_at=t)
            s.add(row)
        row.hostname, row.backend = reg.hostname, reg.backend
        row.resources = reg.resources.model_dump()
        row.status, row.last_seen_at, row.job_id = RunnerStatus.READY.value, t, None
        await s.commit()
        info = runner_model(row)
    ctx.signals.notify("jobs")
    ctx.signals.notify("runners")
    return info


async def heartbeat(ctx: Context, name: str, job_id: str | None) -> HeartbeatReply:
    async with ctx.sessions() as s:
        row = await s.get(RunnerRow, name)
        if row is None:
            raise NotFound(f"no runner '{name}'", hint="register it again")
        if row.status in (RunnerStatus.OFFLINE.value, RunnerStatus.TERMINATED.value):
            # it came back after being given up for lost: its old job has failed; forget it
            reply = HeartbeatReply(stop="abort" if job_id else None)
            row.status, row.job_id = RunnerStatus.READY.value, None
        else:
            reply = HeartbeatReply()
            if job_id:
                job = await s.get(JobRow, job_id)
                if job is not None and job.stop_requested:
                    reply.stop = job.stop_requested
                if job is None or JobStatus(job.status) in FINISHED:
                    reply.stop = reply.stop or "abort"
        row.last_seen_at = now()
        await s.commit()
    return reply


async def deregister(ctx: Context, name: str) -> None:
    """A runner leaves; a job it took and did not finish fails (it will not come back to it)."""
    failed = []
    async with ctx.sessions() as s:
        row = await s.get(RunnerRow, name)
        if row is not None:
            row.status, row.job_id = RunnerStatus.TERMINATED.value, None
            failed = await _fail_jobs_of(s, name, f"runner {name} exited before the job ended")
            await s.commit()
    for job_id in failed:
        ctx.signals.notify(f"job:{job_id}")
    ctx.signals.notify("runners")


async def fail_jobs_of(ctx: Context, runner_names: list[str], reason: str) -> None:
    """The unfinished jobs of these runners FAIL with `reason` (the runners are going away with them)."""
    async with ctx.sessions() as s:
        for name in runner_names:
            await _fail_jobs_of(s, name, reason)
        await s.commit()


async def _fail_jobs_of(s, runner_name: str, reason: str) -> list[str]:
    jobs = (await s.scalars(select(JobRow).where(
        JobRow.runner_name == runner_name, JobRow.status.notin_([x.value for x in FINISHED])))).all()
    for job in jobs:
        job.status = JobStatus.FAILED.value
        job.finished_at = now()
        job.reason = reason
        await refresh_run_status(s, job.run_name)
    return [j.job_id for j in jobs]


async def list_runners(ctx: Context, include_gone: bool = False) -> list[RunnerInfo]:
    q = select(RunnerRow).order_by(RunnerRow.registered_at.desc())
    if not include_gone:
        q = q.where(RunnerRow.status.in_((RunnerStatus.READY.value, RunnerStatus.BUSY.value)))
    async with ctx.sessions() as s:
        return [runner_model(r) for r in (await s.scalars(q)).all()]


async def reap_lost(ctx: Context) -> list[str]:
    """Runners silent for longer than the timeout go OFFLINE; their unfinished jobs FAIL."""
    timeout = ctx.settings.runner_timeout
    cutoff = now() - timedelta(seconds=timeout)
    failed: list[str] = []
    async with ctx.sessions() as s:
        lost = (await s.scalars(select(RunnerRow).where(
            RunnerRow.status.in_((RunnerStatus.READY.value, RunnerStatus.BUSY.value)),
            RunnerRow.last_seen_at < cutoff))).all()
        for r in lost:
            r.status, r.job_id = RunnerStatus.OFFLINE.value, None
            failed += await _fail_jobs_of(s, r.name, f"runner {r.name} stopped responding "
                                                     f"(no heartbeat for {timeout:g}s)")
        await s.commit()
    for job_id in failed:
        ctx.signals.notify(f"job:{job_id}")
    return failed
