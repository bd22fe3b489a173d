"""What runners report about their jobs: status transitions, logs, saved artifacts."""

from __future__ import annotations

import os
import time
from datetime import timedelta

from sqlalchemy import select

from dstack.core.errors import Conflict, Forbidden, NotFound
from dstack.core.models import FINISHED, Job, JobStatus, JobUpdate, RunnerStatus
from dstack.server.context import Context
from dstack.server.db.tables import JobRow, RunnerRow, RunRow
from dstack.server.services import tags
from dstack.server.services.convert import job_model
from dstack.server.services.disk import disk_full, is_disk_full
from dstack.server.services.run_state import now, refresh_run_status


async def update_status(ctx: Context, runner_name: str, job_id: str, upd: JobUpdate) -> JobStatus:
    """Record what the runner says of its job; returns the job's status (a finished job's first word stands).
    When the server's disk is full, the report is refused (503: the runner sends it again later) and what
    was lost is remembered, so that `dstack status` says why the job seems stuck."""
    try:
        status = await _update_status(ctx, runner_name, job_id, upd)
    except Exception as e:
        if not is_disk_full(e):
            raise
        error = disk_full(e, ctx.settings.home / "server", f"the server could not record that job {job_id} is "
                                                           f"{upd.status.value}")
        ctx.unrecorded[job_id] = error.message
        ctx.signals.notify(f"job:{job_id}")
        raise error from None
    ctx.unrecorded.pop(job_id, None)
    return status


async def _update_status(ctx: Context, runner_name: str, job_id: str, upd: JobUpdate) -> JobStatus:
    async with ctx.sessions() as s:
        job = await s.get(JobRow, job_id)
        if job is None:
            raise NotFound(f"no job '{job_id}'")
        if job.runner_name != runner_name:
            raise Conflict(f"job {job_id} is not assigned to runner {runner_name}")
        finished = JobStatus(job.status) in FINISHED
        # a report that came already (the runner retried it, not knowing it had arrived): its output is there
        again = finished and (job.status, job.exit_code) == (upd.status.value, upd.exit_code)
        if upd.logs and not again:  # before the status: a follower that sees the job finished has all its
            # output; it is woken once, when both are there
            offset = None if upd.logs_offset is None else upd.logs_offset + _log_base(job.spec)
            append_logs(ctx, job_id, upd.logs, notify=False, offset=offset)
        if finished:
            if upd.logs and not again:
                ctx.signals.notify(f"job:{job_id}")
            return JobStatus(job.status)  # e.g. failed by the janitor meanwhile: the first word stands
        if upd.status == JobStatus.FAILED:
            from dstack.server.services import retries

            code = f" (exit code {upd.exit_code})" if upd.exit_code else ""
            if retries.requeue(ctx, job, retries.ERROR, f"it failed on runner {runner_name}{code}"):
                runner = await s.get(RunnerRow, runner_name)
                if runner is not None:
                    await settle(s, runner)
                await refresh_run_status(s, job.run_name)
                await s.commit()
                ctx.signals.notify(f"job:{job_id}")
                ctx.signals.notify("jobs")
                return upd.status
        job.status = upd.status.value
        if upd.exit_code is not None:
            job.exit_code = upd.exit_code
        if upd.reason and not (job.stop_requested and job.reason):  # the server's word for a stop it asked for
            job.reason = upd.reason
        if upd.image_digest:
            job.image_digest = upd.image_digest
        if upd.ports is not None:
            job.ports = upd.ports
        if upd.artifacts is not None:
            job.saved_artifacts = upd.artifacts
        if upd.status in FINISHED:
            job.finished_at = now()
            if upd.ended_ago:
                job.finished_at = max(job.finished_at - timedelta(seconds=upd.ended_ago),
                                      job.started_at or job.finished_at)
            runner = await s.get(RunnerRow, runner_name)
            if runner is not None:
                await settle(s, runner)
        stopped = []
        if upd.status == JobStatus.FAILED and (job.spec or {}).get("nodes", 1) > 1:
            from dstack.server.services.gangs import stop_the_others

            stopped = await stop_the_others(s, job)
        run_done = await refresh_run_status(s, job.run_name) == JobStatus.DONE
        if run_done:
            run = await s.get(RunRow, job.run_name)
            if run.tag_when_done:
                await tags.set_tag(s, run, run.tag_when_done)
        await s.commit()
    ctx.signals.notify(f"job:{job_id}")
    for other in stopped:
        ctx.signals.notify(f"job:{other}")
    if upd.status in FINISHED:
        ctx.signals.notify("jobs")  # what it held of its runner is free: a job that waits for it is taken now
    return upd.status


async def append_runner_logs(ctx: Context, runner_name: str, job_id: str, data: bytes, **append) -> None:
    """Output that a runner sends of its job, appended to the job's log: only from the runner the job is assigned
    to, and only while the job has not finished (its last output travels with its final status instead, see
    update_status); no log is made for a job the server does not know. `append`: append_logs's options."""
    async with ctx.sessions() as s:
        job = (await s.execute(select(JobRow.runner_name, JobRow.status, JobRow.spec)
                                .where(JobRow.job_id == job_id))).first()
    if job is None:
        raise NotFound(f"no job '{job_id}'")
    if job.runner_name != runner_name:
        raise Conflict(f"job {job_id} is not assigned to runner {runner_name}; its output comes from its own runner")
    if JobStatus(job.status) in FINISHED:
        raise Conflict(f"job {job_id} is {job.status}: its log takes no more output")
    if append.get("offset") is not None:  # the runner counts from this attempt's start (see services/retries)
        append["offset"] += _log_base(job.spec)
    append_logs(ctx, job_id, data, **append)


async def settle(s, runner: RunnerRow) -> bool:
    """The runner is BUSY while a job it was given has not ended, else READY (a live one); whether busy."""
    busy = bool(await s.scalar(select(JobRow.job_id).where(
        JobRow.runner_name == runner.name, JobRow.status.not_in([x.value for x in FINISHED])).limit(1)))
    if runner.status in (RunnerStatus.READY.value, RunnerStatus.BUSY.value):
        runner.status = RunnerStatus.BUSY.value if busy else RunnerStatus.READY.value
    return busy


def _log_base(spec: dict | None) -> int:
    return int((spec or {}).get("log_base") or 0)


def log_path(ctx: Context, job_id: str):
    return ctx.settings.logs_dir / f"{job_id}.log"


def append_logs(ctx: Context, job_id: str, data: bytes, notify: bool = True, offset: int | None = None) -> None:
    """Append output to a job's log. `offset`: where `data` starts in the job's output as its runner sent it;
    bytes the log holds already (a batch sent again: the runner did not hear that it had arrived) are not
    appended twice."""
    path = log_path(ctx, job_id)
    with open(path, "ab") as f:
        if offset is not None:
            have = f.tell()
            if offset + len(data) <= have:
                return
            if offset < have:
                data = data[have - offset:]
        f.write(data)
    if notify:
        ctx.signals.notify(f"job:{job_id}")


LOG_CHUNK = 4 * 1024 * 1024


def read_logs(ctx: Context, job_id: str, offset: int, limit: int = LOG_CHUNK) -> bytes:
    try:
        with open(log_path(ctx, job_id), "rb") as f:
            if offset >= os.fstat(f.fileno()).st_size:  # past the end: nothing yet (a huge offset is EINVAL)
                return b""
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


async def wait_logs(ctx: Context, job_id: str, offset: int, wait: float,
                    seen: JobStatus | None = None) -> tuple[bytes, Job, bool]:
    """New log bytes from `offset` (at most LOG_CHUNK); waits up to `wait` s for some, for the job to finish,
    or (given the status `seen` last) for its status to change. Also whether more bytes follow these. The job
    is read before its log: a finished job has shipped all its output, so once it is finished and nothing more
    follows, a follower has seen everything."""
    deadline = time.monotonic() + wait
    while True:
        changed = ctx.signals.listen(f"job:{job_id}")
        job = await _job(ctx, job_id)
        data = read_logs(ctx, job_id, offset)
        if (data or job.status in FINISHED or (seen is not None and job.status != seen)
                or time.monotonic() >= deadline or ctx.stopping):
            return data, job, len(data) >= LOG_CHUNK
        await ctx.signals.wait(changed, deadline - time.monotonic())


async def _job(ctx: Context, job_id: str) -> Job:
    async with ctx.sessions() as s:
        row = await s.get(JobRow, job_id)
        if row is None:
            raise NotFound(f"no job '{job_id}'")
        return job_model(row, with_spec=False)


def ensure_dirs(ctx: Context) -> None:
    os.makedirs(ctx.settings.logs_dir, exist_ok=True)


async def runner_may_read_code(ctx: Context, runner: str, digest: str) -> None:
    """A runner reads only the code of the jobs it was given and that have not ended."""
    async with ctx.sessions() as s:
        specs = (await s.scalars(select(JobRow.spec).where(
            JobRow.runner_name == runner, JobRow.status.not_in([j.value for j in FINISHED])))).all()
    for spec in specs:
        code = spec.get("code") or {}
        if digest in (code.get("diff_hash"), code.get("files_hash"), code.get("archive_hash")):
            return
    raise Forbidden(f"runner {runner} runs no job whose code is {digest[:12]}")
