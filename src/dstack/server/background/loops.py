"""The server's background work: the janitor (lost runners) and the autoscaler (runners on demand)."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import select

from dstack.backends.base import Bootstrap
from dstack.core.models import JobSpec, JobStatus, RunnerStatus
from dstack.core.resources import RunnerResources, Usage, place
from dstack.server.context import Context
from dstack.server.db.tables import JobRow, RunnerRow
from dstack.server.services import runner_tokens, runners
from dstack.server.services.scheduler import fits, usage_of

log = logging.getLogger("dstack.server")
STARTUP_GRACE = 60.0  # a runner process that has not registered by then is given up
# after a job is queued, the pass waits this long: an idle runner takes the job meanwhile without the pass's
# queries competing with its take, and only a job still queued then needs a new runner (which takes seconds)
AFTER_QUEUED = 0.1


async def autoscale(ctx: Context) -> None:
    """Start a runner for each queued job that no live runner has room for now (nor one starting) can take."""
    async with ctx.sessions() as s:
        queued_now = JobRow.status == JobStatus.SUBMITTED.value, JobRow.runner_name.is_(None)
        if not ctx.backends or await s.scalar(select(JobRow.job_id).where(*queued_now).limit(1)) is None:
            return  # nothing to start a runner for: the pass costs one small query
        # runners first: a job seen queued below was queued while they were as seen here
        live = (await s.scalars(select(RunnerRow).where(
            RunnerRow.status.in_((RunnerStatus.READY.value, RunnerStatus.BUSY.value))))).all()
        queued = (await s.scalars(select(JobRow).where(*queued_now)
            .order_by(JobRow.submitted_at))).all()
        if not queued:
            return
        draining = await runner_tokens.draining(s)
        used = await usage_of(s, [r.name for r in live])
    # what live runners have free now; a queued job that fits there is taken by one of them
    rooms = [(RunnerResources.model_validate(r.resources), r.labels, used.get(r.name, Usage())) for r in live
             if r.name not in draining]
    registered = {r.name for r in live}
    for backend in ctx.backends:
        instances = backend.list()
        _count_failed_starts(ctx, backend, {i.runner_name for i in instances}, registered)
        _, retry_at, _ = ctx.start_failures.get(backend.name, (0, 0.0, ""))
        starting = [i for i in instances if i.runner_name not in registered
                    and time.monotonic() - i.started_at < STARTUP_GRACE]
        alive = len(instances)
        spare = len(starting)
        for row in queued:
            job = JobSpec.model_validate(row.spec)
            room = next(((u, gpus) for res, labels, u in rooms if not fits(job, res, labels)
                         and (gpus := place(job.requirements, res, u)) is not None), None)
            if room is not None:  # a live runner will take it: its room is counted as taken
                room[0].add(job.requirements, room[1])
                continue
            if spare > 0:
                spare -= 1
                continue
            if alive >= backend.max_runners or time.monotonic() < retry_at:
                break
            # the cheapest that fits first
            offer = min((o for o in backend.offers() if not fits(job, o.resources)), key=lambda o: o.price,
                        default=None)
            if offer is None:
                continue
            # a token of its own, never the admin's: it can do a runner's work and nothing else
            identity = await runner_tokens.issue(ctx, None, {}, issued_by=backend.name)
            instances.append(backend.create(offer, Bootstrap(
                server_url=ctx.settings.url, token=identity.token, runner_name=identity.name,
                idle_timeout=ctx.settings.runner_idle_timeout)))
            ctx.starting[identity.name] = backend.name
            log.info("started %s runner %s for job %s (%s)", backend.name, identity.name, row.job_id,
                     offer.describe())
            alive += 1


def _count_failed_starts(ctx: Context, backend, running: set[str], registered: set[str]) -> None:
    """A runner the backend started that is gone before it registered failed to start: the next one is started
    only after a back-off (1, 2, 4 ... 60 s), and queued jobs say why they wait. One that registers ends it."""
    for name, of in list(ctx.starting.items()):
        if of != backend.name:
            continue
        if name in registered:
            del ctx.starting[name]
            ctx.start_failures.pop(backend.name, None)
        elif name not in running:
            del ctx.starting[name]
            failures = ctx.start_failures.get(backend.name, (0, 0.0, ""))[0] + 1
            delay = min(60.0, 2.0 ** (failures - 1))
            why = (f"the {backend.name} backend's runner {name} exited before it registered "
                   f"({failures} in a row; {backend.describe_failure(name)}); trying again in {delay:g} s")
            ctx.start_failures[backend.name] = (failures, time.monotonic() + delay, why)
            log.warning("%s", why)


async def run_loops(ctx: Context, interval: float = 0.5) -> None:
    while True:
        try:
            lost = await runners.reap_lost(ctx)
            for backend in ctx.backends if lost else ():
                await asyncio.to_thread(backend.release_jobs, lost)
            await autoscale(ctx)
        except asyncio.CancelledError:
            raise
        except Exception:  # keep the loop alive; the next pass retries
            log.exception("background pass failed")
        if await ctx.signals.wait(ctx.signals.listen("jobs"), interval):
            await asyncio.sleep(AFTER_QUEUED)
