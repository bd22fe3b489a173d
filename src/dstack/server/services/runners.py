"""Runners: registration, heartbeats, and what happens to the jobs of a runner that goes silent."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import select

from dstack.core.errors import Conflict, NotFound
from dstack.core.models import (
    FINISHED,
    LIVE_RUNNERS,
    HeartbeatReply,
    JobStatus,
    RunnerInfo,
    RunnerRegistration,
    RunnerStatus,
)
from dstack.core.names import random_base
from dstack.core.resources import Usage
from dstack.server.context import Context
from dstack.server.db.tables import InstanceRow, JobRow, RunnerRow, RunnerTokenRow
from dstack.server.services import runner_tokens
from dstack.server.services.convert import runner_model
from dstack.server.services.jobs import log_path, settle
from dstack.server.services.run_state import now, refresh_run_status

log = logging.getLogger("dstack.server")


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
        job = await s.get(JobRow, row.job_id) if row is not None and row.job_id else None
        if (row is not None and row.status == RunnerStatus.BUSY.value and job is not None
                and JobStatus(job.status) not in FINISHED and (t - row.last_seen_at).total_seconds() < timeout):
            raise Conflict(f"runner {name} is registered already and runs job {row.job_id}",
                           hint=f"start this runner with another --name; if that runner is gone, the server gives "
                                f"it up {timeout:g} s after its last heartbeat")
        identity = await s.get(RunnerTokenRow, name)
        if row is None:
            row = RunnerRow(name=name, registered_at=t)
            s.add(row)
        row.labels = {**(identity.labels if identity is not None else {}), **reg.labels}
        row.version = reg.version
        row.hostname, row.backend = reg.hostname, reg.backend
        row.resources = reg.resources.model_dump()
        row.status, row.last_seen_at, row.job_id = RunnerStatus.READY.value, t, None
        await s.commit()
        ctx.forget_quiet(name)
        info = runner_model(row)
    ctx.signals.notify("jobs")
    ctx.signals.notify("runners")
    return info


# a job its runner does not say it was given (the answer to its `take` was lost, or is on its way) is taken
# back only this long after the take
TAKE_LOST_AFTER = 60.0


# an idle runner heartbeats this often (s; at most a third of the runner timeout); one that runs jobs, every second
IDLE_HEARTBEAT = 10.0
BUSY_HEARTBEAT = 1.0
# an idle runner's heartbeats are answered from memory for this long after one that read the database
QUIET_FOR = 60.0  # as long as a take whose answer was lost is waited for (TAKE_LOST_AFTER)


def heartbeat_interval(ctx: Context, busy: bool) -> float:
    return min(BUSY_HEARTBEAT if busy else IDLE_HEARTBEAT, ctx.settings.runner_timeout / 3)


async def heartbeat(ctx: Context, name: str, job_ids: list[str], last_taken: str | None = None) -> HeartbeatReply:
    """A runner is alive, and says which jobs it runs. The reply tells it which of them to stop or abort.
    Where the runner and the server disagree, the runner is right about what it runs: a job it does not run
    (it gave up on the job's reports, it was restarted, the answer to its `take` was lost) is put back in the
    queue when it never started, else it fails, saying so; a job the server has given up on is aborted.
    An idle runner that the last look found idle, with nothing to settle, is answered from memory: an idle
    runner costs the server next to nothing (whatever could change that forgets it: `Context.forget_quiet`)."""
    t = time.monotonic()
    ctx.heard[name] = t  # alive, even when the database cannot record it (a full disk)
    if not job_ids and t - ctx.quiet.get(name, float("-inf")) < QUIET_FOR:
        return HeartbeatReply(next_in=heartbeat_interval(ctx, busy=False))
    ctx.forget_quiet(name)
    failed: list[str] = []
    async with ctx.sessions() as s:
        row = await s.get(RunnerRow, name)
        if row is None:
            raise NotFound(f"no runner '{name}'", hint="register it again")
        was = row.status
        if row.status in (RunnerStatus.OFFLINE.value, RunnerStatus.TERMINATED.value):
            # it came back after being given up for lost: its old jobs have failed; forget them
            reply = HeartbeatReply(stops={job_id: "abort" for job_id in job_ids})
            row.status, row.job_id = RunnerStatus.READY.value, None
            busy = False
        else:
            reply = HeartbeatReply()
            for job_id in job_ids:
                job = await s.get(JobRow, job_id)
                how = job.stop_requested if job is not None else None
                if job is None or job.runner_name != name or JobStatus(job.status) in FINISHED:
                    how = how or "abort"
                if how:
                    reply.stops[job_id] = how
            ours = (await s.scalars(select(JobRow).where(
                JobRow.runner_name == name, JobRow.status.not_in([x.value for x in FINISHED])))).all()
            for job in ours:
                if job.job_id not in job_ids and (job.spec or {}).get("delivered", True) is not False:
                    failed += await _reconcile(ctx, s, name, job, knows=last_taken == job.job_id)
            busy = await settle(s, row)
            identity = await s.get(RunnerTokenRow, name)
            draining = identity is not None and identity.draining
            reply.terminate = bool(draining and not job_ids and not busy)
            if not job_ids and not busy and not draining and not failed:
                ctx.quiet[name] = t
        reply.stop = reply.stops.get(job_ids[0]) if job_ids else None  # a runner before 0.4 runs one job
        reply.next_in = heartbeat_interval(ctx, busy=bool(job_ids or busy))
        if row.status != was or (now() - row.last_seen_at).total_seconds() > ctx.settings.runner_timeout / 3:
            row.last_seen_at = now()  # for `dstack runners` and a restarted server; while it runs, `heard` counts
        await s.commit()
    for failed_id in failed:
        ctx.signals.notify(f"job:{failed_id}")
    if failed:
        ctx.signals.notify("jobs")
    return reply


def last_heard(ctx: Context, name: str, recorded):
    """When the runner was last heard from: what the database recorded, or later, what this server heard."""
    heard = ctx.heard.get(name)
    if heard is None:
        return recorded
    return max(recorded, now() - timedelta(seconds=time.monotonic() - heard))


def _has_output(ctx: Context, job_id: str) -> bool:
    try:
        return log_path(ctx, job_id).stat().st_size > 0
    except FileNotFoundError:
        return False


async def _reconcile(ctx: Context, s, runner_name: str, job: JobRow, knows: bool) -> list[str]:
    """The server has `job` on the runner, which does not run it. `knows`: the runner says it was given that
    job (so it has ended there); else the answer to its `take` may still be on its way, and the job is taken
    back only once that cannot be. Returns the jobs it changed."""
    if not knows and job.started_at is not None and (now() - job.started_at).total_seconds() < TAKE_LOST_AFTER:
        return []
    if job.status == JobStatus.PROVISIONING.value and not _has_output(ctx, job.job_id):
        # never started there: back in the queue, for this runner or another
        job.status, job.runner_name, job.started_at, job.runner_resources = (
            JobStatus.SUBMITTED.value, None, None, None)
        log.warning("runner %s does not run job %s that it took: queued again", runner_name, job.job_id)
    else:
        job.status, job.finished_at = JobStatus.FAILED.value, now()
        job.reason = (f"runner {runner_name} no longer runs the job, and its end was never reported (the "
                      f"runner gave up reporting it, or was restarted); its artifacts were not saved")
    await refresh_run_status(s, job.run_name)
    return [job.job_id]


async def server_started(ctx: Context, local_runners: set[str]) -> None:
    """A (re)started server gives the runners it knows a full timeout to reach it again before they count as
    lost; a local runner whose process is gone (it did not outlive the server) is gone now, with its jobs."""
    failed: list[str] = []
    async with ctx.sessions() as s:
        live = (await s.scalars(select(RunnerRow).where(
            RunnerRow.status.in_((RunnerStatus.READY.value, RunnerStatus.BUSY.value))))).all()
        for r in live:
            if r.backend == "local" and r.name not in local_runners:
                r.status, r.job_id = RunnerStatus.TERMINATED.value, None
                ctx.forget_quiet(r.name)
                failed += await _fail_jobs_of(s, r.name, f"runner {r.name} ended while the server was down", ctx)
            else:
                r.last_seen_at = now()
        await s.commit()
    for job_id in failed:
        ctx.signals.notify(f"job:{job_id}")
    if failed:
        ctx.signals.notify("jobs")  # some may be queued again (retry)


async def terminated(ctx: Context, names: list[str]) -> None:
    """These runners have been stopped (and could not say so themselves): not listed as READY any more."""
    async with ctx.sessions() as s:
        for name in names:
            row = await s.get(RunnerRow, name)
            if row is not None and row.status in (RunnerStatus.READY.value, RunnerStatus.BUSY.value):
                row.status, row.job_id = RunnerStatus.TERMINATED.value, None
                ctx.forget_quiet(name)
        await s.commit()


async def deregister(ctx: Context, name: str) -> None:
    """A runner leaves; a job it took and did not finish fails (it will not come back to it). The token of a
    runner that a backend started, or that was removed (drained), works no more."""
    failed = []
    async with ctx.sessions() as s:
        row = await s.get(RunnerRow, name)
        if row is not None:
            row.status, row.job_id = RunnerStatus.TERMINATED.value, None
            ctx.forget_quiet(name)
            failed = await _fail_jobs_of(s, name, f"runner {name} exited before the job ended", ctx)
            await s.commit()
        identity = await s.get(RunnerTokenRow, name)
        done_with = identity is not None and (identity.draining or identity.issued_by != runner_tokens.ADMIN)
    if done_with:
        await runner_tokens.revoke(ctx, name)
    for job_id in failed:
        ctx.signals.notify(f"job:{job_id}")
    if failed:
        ctx.signals.notify("jobs")  # some may be queued again (retry)
    ctx.signals.notify("runners")


async def interrupted(ctx: Context, name: str, action: str, when: str | None) -> list[str]:
    """The runner's spot machine is being taken back (its provider's notice, about two minutes ahead): it takes
    no new job, and its jobs go back to the queue where `retry` allows, else FAIL "interrupted" (the runner
    stops what the server has ended, at its next heartbeat). The job ids."""
    from dstack.server.services import retries

    await runner_tokens.drain(ctx, name)
    why = f"interrupted: runner {name}'s spot machine is being taken back ({action}" + (f" at {when})" if when else ")")
    async with ctx.sessions() as s:
        ended = await _fail_jobs_of(s, name, why, ctx, cause=retries.INTERRUPTED)
        await s.commit()
    ctx.forget_quiet(name)
    for job_id in ended:
        ctx.signals.notify(f"job:{job_id}")
    if ended:
        ctx.signals.notify("jobs")
    log.warning("%s; its jobs: %s", why, ", ".join(ended) or "none")
    return ended


async def fail_jobs_of(ctx: Context, runner_names: list[str], reason: str) -> None:
    """The unfinished jobs of these runners FAIL with `reason` (the runners are going away with them)."""
    async with ctx.sessions() as s:
        for name in runner_names:
            await _fail_jobs_of(s, name, reason)
        await s.commit()


async def _fail_jobs_of(s, runner_name: str, reason: str, ctx: Context | None = None,
                        cause: str | None = None) -> list[str]:
    """The unfinished jobs of a runner that is gone FAIL with `reason`; given `ctx`, those whose workflow says
    `retry` (on `cause`, default runner-lost) go back to the queue instead (services/retries)."""
    from dstack.server.services import retries

    jobs = (await s.scalars(select(JobRow).where(
        JobRow.runner_name == runner_name, JobRow.status.notin_([x.value for x in FINISHED])))).all()
    for job in jobs:
        if ctx is None or not retries.requeue(ctx, job, cause or retries.RUNNER_LOST, reason):
            job.status = JobStatus.FAILED.value
            job.finished_at = now()
            job.reason = reason
        await refresh_run_status(s, job.run_name)
    return [j.job_id for j in jobs]


async def list_runners(ctx: Context, include_gone: bool = False) -> list[RunnerInfo]:
    q = select(RunnerRow).order_by(RunnerRow.registered_at.desc())
    if not include_gone:
        q = q.where(RunnerRow.status.in_((RunnerStatus.READY.value, RunnerStatus.BUSY.value)))
    from dstack.server.services.scheduler import usage_of

    async with ctx.sessions() as s:
        draining = await runner_tokens.draining(s)
        rows = (await s.scalars(q)).all()
        used = await usage_of(s, [r.name for r in rows])
        jobs: dict[str, list[str]] = {}
        for runner, job_id in (await s.execute(select(JobRow.runner_name, JobRow.job_id).where(
                JobRow.runner_name.in_([r.name for r in rows]),
                JobRow.status.not_in([x.value for x in FINISHED])).order_by(JobRow.started_at))).all():
            jobs.setdefault(runner, []).append(job_id)
        offers = dict((await s.execute(select(InstanceRow.runner_name, InstanceRow.offer).where(
            InstanceRow.runner_name.in_([r.name for r in rows])))).all())
    infos = []
    for r in rows:
        info = runner_model(r, r.name in draining)
        info.last_seen_at = last_heard(ctx, r.name, r.last_seen_at)
        info.jobs = jobs.get(r.name, [])
        info.free = used.get(r.name, Usage()).free(info.resources)
        if r.name in offers:  # a backend's instance: its price, and what it is
            info.price, info.offer = float(offers[r.name].get("price") or 0), offers[r.name].get("describe")
        infos.append(info)
    return infos


async def remove(ctx: Context, name: str, force: bool) -> RunnerInfo | dict:
    """`dstack runners remove`: a runner that runs takes no new job and goes once its job has ended (with
    `force`, its job is stopped now, artifacts saved); its token works no more once it has gone. One that does
    not run is removed at once. Returns the runner as it is now, or {} when it is gone."""
    from dstack.server.services import runs

    async with ctx.sessions() as s:
        row = await s.get(RunnerRow, name)
        live = row is not None and row.status in (RunnerStatus.READY.value, RunnerStatus.BUSY.value)
        job_ids = (await s.scalars(select(JobRow.job_id).where(
            JobRow.runner_name == name, JobRow.status.not_in([x.value for x in FINISHED])))).all() if live else []
    if not live:
        if await runner_tokens.identity(ctx, name) is None and row is None:
            raise NotFound(f"no runner named '{name}'", hint="`dstack runners -a` lists them")
        if await runner_tokens.identity(ctx, name) is not None:
            await runner_tokens.revoke(ctx, name)
        return {}
    await runner_tokens.drain(ctx, name)
    for job_id in job_ids if force else []:
        await runs.stop(ctx, None, job_id, abort=False)
    ctx.signals.notify("runners")
    ctx.signals.notify("jobs")  # its long poll for a job answers now
    return next(r for r in await list_runners(ctx, include_gone=True) if r.name == name)


async def reap_lost(ctx: Context) -> list[str]:
    """Runners silent for longer than the timeout go OFFLINE; their unfinished jobs FAIL. Silent: neither the
    database nor this server (`heard`: a quiet runner's heartbeats are not written down) has heard from it."""
    timeout = ctx.settings.runner_timeout
    cutoff = now() - timedelta(seconds=timeout)
    failed: list[str] = []
    async with ctx.sessions() as s:
        stale = (await s.scalars(select(RunnerRow.name).where(  # names alone: most are quiet, not lost
            RunnerRow.status.in_(LIVE_RUNNERS), RunnerRow.last_seen_at < cutoff))).all()
        lost = [name for name in stale if time.monotonic() - ctx.heard.get(name, float("-inf")) >= timeout]
        for name in lost:
            r = await s.get(RunnerRow, name)
            ctx.forget_quiet(name)
            r.status, r.job_id = RunnerStatus.OFFLINE.value, None
            failed += await _fail_jobs_of(s, r.name, f"runner {r.name} stopped responding "
                                                     f"(no heartbeat for {timeout:g}s)", ctx)
        if lost:
            await s.commit()
    for job_id in failed:
        ctx.signals.notify(f"job:{job_id}")
    if failed:
        ctx.signals.notify("jobs")  # some may be queued again (retry)
    return failed
