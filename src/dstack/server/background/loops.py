"""The server's background work: the janitor (lost runners) and the autoscaler (runners on demand, and their
teardown: services/autoscaler.py)."""

from __future__ import annotations

import asyncio
import logging

from dstack.server.context import Context
from dstack.server.services import autoscaler, runners

log = logging.getLogger("dstack.server")
# after a job is queued, the pass waits this long: an idle runner takes the job meanwhile without the pass's
# queries competing with its take, and only a job still queued then needs a new runner (which takes seconds)
AFTER_QUEUED = 0.1


async def run_loops(ctx: Context, interval: float = 0.5) -> None:
    while True:
        try:
            lost = await runners.reap_lost(ctx)
            for backend in ctx.backends if lost else ():
                await asyncio.to_thread(backend.release_jobs, lost)
            await autoscaler.reconcile(ctx)
            await autoscaler.provision(ctx)
            await autoscaler.teardown(ctx)
        except asyncio.CancelledError:
            raise
        except Exception:  # keep the loop alive; the next pass retries
            log.exception("background pass failed")
        if await ctx.signals.wait(ctx.signals.listen("jobs"), interval) and await autoscaler.any_live_runner(ctx):
            await asyncio.sleep(AFTER_QUEUED)  # with none, no runner can take it meanwhile: start one at once
