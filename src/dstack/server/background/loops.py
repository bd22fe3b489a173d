"""The server's background work: the janitor (lost runners) and the autoscaler (runners on demand)."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import select

from dstack.backends.base import Bootstrap
from dstack.core.models import JobSpec, JobStatus, RunnerStatus
from dstack.core.resources import RunnerResources
from dstack.server.context import Context
from dstack.server.db.tables import JobRow, RunnerRow
from dstack.server.services import runners
from dstack.server.services.scheduler import fits

log = logging.getLogger("dstack.server")
STARTUP_GRACE = 60.0  # a runner process that has not registered by then is given up
# after a job is queued, the pass waits this long: an idle runner takes the job meanwhile without the pass's
# queries competing with its take, and only a job still queued then needs a new runner (which takes seconds)
AFTER_QUEUED = 0.1


async def autoscale(ctx: Context) -> None:
    """Start a runner for each queued job that no idle runner (nor one starting) can take."""
    async with ctx.sessions() as s:
        # runners first: a job seen queued below was queued while they were as seen here
        live = (await s.scalars(select(RunnerRow).where(
            RunnerRow.status.in_((RunnerStatus.READY.value, RunnerStatus.BUSY.value))))).all()
        queued = (await s.scalars(select(JobRow).where(
            JobRow.status == JobStatus.SUBMITTED.value, JobRow.runner_name.is_(None))
            .order_by(JobRow.submitted_at))).all()
        if not queued:
            return
    idle = [RunnerResources.model_validate(r.resources) for r in live if not r.job_id]
    registered = {r.name for r in live}
    for backend in ctx.backends:
        instances = backend.list()
        starting = [i for i in instances if i.runner_name not in registered
                    and time.monotonic() - i.started_at < STARTUP_GRACE]
        alive = len(instances)
        spare = len(idle) + len(starting)
        for row in queued:
            job = JobSpec.model_validate(row.spec)
            if any(not fits(job, res) for res in idle):
                spare -= 1  # an idle runner will take it
                continue
            if spare > 0:
                spare -= 1
                continue
            if alive >= backend.max_runners:
                break
            offer = next((o for o in backend.offers() if not fits(job, o)), None)
            if offer is None:
                continue
            async with ctx.sessions() as s:
                name = await runners.new_name(s, exclude={i.runner_name for i in instances})
            instances.append(backend.create(offer, Bootstrap(
                server_url=ctx.settings.url, token=ctx.settings.token, runner_name=name,
                idle_timeout=ctx.settings.runner_idle_timeout)))
            log.info("started %s runner %s for job %s", backend.name, name, row.job_id)
            alive += 1


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
