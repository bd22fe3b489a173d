"""Which runner may take which job, and whether any ever could."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import select, update

from dstack.core.errors import Unavailable, Unsatisfiable
from dstack.core.models import FINISHED, LIVE_RUNNERS, JobSpec, JobStatus, RunnerStatus
from dstack.core.resources import Requirements, RunnerResources, Usage, missing, most_offered, place
from dstack.server.context import Context
from dstack.server.db.tables import JobRow, RunnerRow, RunnerTokenRow
from dstack.server.services import gangs, runner_tokens
from dstack.server.services.backends import allowed_offers, capacity
from dstack.server.services.run_state import now, refresh_run_status


def fits(job: JobSpec, res: RunnerResources, labels: dict[str, str] | None = None) -> list[str]:
    """What a runner with `res` and `labels` lacks to run `job`: empty when it fits."""
    return missing(job.requirements, res, needs_docker=bool(job.image), labels=labels)


async def check_satisfiable(ctx: Context, job: JobSpec) -> list[tuple[str, str]]:
    """Fail now, naming what is missing, when no live runner and no backend could ever run `job`; else the
    warnings about what it asks for that it will not get: (the resource, as `resources` names it; the text)."""
    async with ctx.sessions() as s:
        runners = (await s.scalars(select(RunnerRow).where(RunnerRow.status.in_(LIVE_RUNNERS)))).all()
        draining = await runner_tokens.draining(s)
    offers = [(f"runner {r.name}", RunnerResources.model_validate(r.resources), r.labels) for r in runners
              if r.name not in draining]
    machines = [1] * len(offers)  # how many machines each offer is: a backend's, as many as it may still start
    refused: list[tuple[str, RunnerResources, str]] = []  # offers that the backends' limits do not allow
    for backend in ctx.backends:
        allowed, not_allowed = await asyncio.to_thread(allowed_offers, ctx, backend)
        more = [(f"backend {backend.name}", offer.resources, {}) for offer in allowed]
        offers += more
        alive = sum(r.backend == backend.name and r.name not in draining for r in runners)
        machines += [max(0, capacity(ctx, backend) - alive)] * len(more)
        refused += [(f"{o.describe()}", o.resources, why) for o, why in not_allowed]
    lacking: dict[tuple[str, ...], list[str]] = {}  # what they lack -> who lacks it: alike machines said once
    for who, res, labels in offers:
        lacks = fits(job, res, labels)
        if not lacks:
            if job.nodes > 1 and job.rank == 0:
                _check_room_for_all(job, offers, machines)
            return _warnings(job, [res for _, res, _ in offers])
        lacking.setdefault(tuple(lacks), []).append(who)
    barred = [f"{who} ({why})" for who, res, why in refused if not fits(job, res)]
    if barred:
        raise Unsatisfiable(f"only offers that the backends' limits refuse could run '{job.workflow}' "
                            f"({job.requirements.describe()}): {_names(barred)}",
                            hint="`dstack limits` shows the limits; `dstack limits set BACKEND ...` changes them")
    if not offers:
        raise Unsatisfiable("no runner is registered and no backend is configured",
                            hint="start one with `dstack-runner start --server URL --token TOKEN`")
    detail = "; ".join(f"{_names(whos)} {'lacks' if len(whos) == 1 else 'each lack'} {', '.join(lacks)}"
                       for lacks, whos in lacking.items())
    raise Unsatisfiable(
        f"no runner and no backend can provide what '{job.workflow}' needs ({job.requirements.describe()}): "
        f"{detail}",
        hint="ask for less in the workflow's `resources` (or in the variables they use), or add a runner "
             "that has it: `dstack-runner start --server URL --token TOKEN` on such a machine",
        most=most_offered(job.requirements, [res for _, res, _ in offers]),
        lacking=_lacking_beyond_sizes(job, offers),
    )


def _check_room_for_all(job: JobSpec, offers: list[tuple[str, RunnerResources, dict]], machines: list[int]) -> None:
    """A multi-node run whose jobs could never all run at once (they are placed together or not at all) fails
    now, saying how many of them the runners and backends here could hold."""
    held: list[tuple[str, int]] = []
    for (who, res, labels), count in zip(offers, machines, strict=True):
        if not count or fits(job, res, labels):
            continue
        used, n = Usage(), 0
        while n < job.nodes and (gpus := place(job.requirements, res, used)) is not None:
            used.add(job.requirements, gpus)
            n += 1
        held.append((who, n * count))
    total = sum(n for _, n in held)
    if total >= job.nodes:
        return
    raise Unsatisfiable(
        f"'{job.workflow}' asks for {job.nodes} nodes, and the runners and backends here can hold {total} of its "
        f"jobs at once ({', '.join(f'{who}: {n}' for who, n in held)}); a multi-node run starts all its jobs "
        "together or none",
        hint=f"ask for `nodes: {total}` or fewer (or less in `resources`, so that more fit on a machine), or add "
             "runners: `dstack-runner start --server URL --token TOKEN` on more machines",
        lacking={"nodes"})


def _lacking_beyond_sizes(job: JobSpec, offers: list[tuple[str, RunnerResources, dict]]) -> set[str]:
    """What some runner or offer lacks that is no size: Docker for a job with an image, the job's labels."""
    lacking = set()
    if job.image and any(not res.docker for _, res, _ in offers):
        lacking.add("docker")
    if any(labels.get(k) != v for _, _, labels in offers for k, v in job.requirements.labels.items()):
        lacking.add("labels")
    return lacking


def _names(whos: list[str], shown: int = 3) -> str:
    if len(whos) <= shown:
        return " and ".join([", ".join(whos[:-1]), whos[-1]] if len(whos) > 1 else whos)
    return f"{', '.join(whos[:shown])} and {len(whos) - shown} more"


def _warnings(job: JobSpec, offers: list[RunnerResources]) -> list[tuple[str, str]]:
    if job.requirements.interruptible and not any(o.interruptible for o in offers):
        return [("interruptible", f"'{job.workflow}' asks for an interruptible (spot) machine, and no runner or "
                                  "backend here has one: it runs on an on-demand machine")]
    return []


async def take_job(ctx: Context, runner_name: str, wait: float,
                   gone: Callable[[], Awaitable[bool]] | None = None, port: int | None = None) -> JobSpec | None:
    """The oldest queued job this runner can run, assigned to it; waits up to `wait` s for one. `gone()`: whether
    the runner hung up meanwhile (it was killed): then it is given nothing, and the job waits for another."""
    deadline = time.monotonic() + wait
    while True:
        queued = ctx.signals.listen("jobs")
        if ctx.stopping:
            raise Unavailable("the server is stopping", hint="a runner waits for it to come back")
        if gone is not None and await gone():
            return None
        if await _draining(ctx, runner_name):
            return None  # `dstack runners remove`: it takes no new job
        async with ctx.take_lock:  # one take at a time: each counts what the others have placed
            job = await _try_take(ctx, runner_name, port)
        if job is not None or time.monotonic() >= deadline:
            return job
        await ctx.signals.wait(queued, deadline - time.monotonic())


async def _draining(ctx: Context, runner_name: str) -> bool:
    async with ctx.sessions() as s:
        return bool(await s.scalar(select(RunnerTokenRow.draining).where(RunnerTokenRow.name == runner_name)))


RESERVE_AFTER = float(os.environ.get("DSTACK_RESERVE_AFTER", "60"))  # s a job that fits waits before it is
# given the next runner where it fits, ahead of the smaller jobs behind it


async def usage_of(s, runner_names: list[str] | None = None) -> dict[str, Usage]:
    """What the unfinished jobs of each runner (of `runner_names`, or all) take of it."""
    q = select(JobRow.runner_name, JobRow.spec).where(
        JobRow.runner_name.is_not(None), JobRow.status.not_in([x.value for x in FINISHED]))
    if runner_names is not None:
        q = q.where(JobRow.runner_name.in_(runner_names))
    used: dict[str, Usage] = {}
    for name, spec in (await s.execute(q)).all():  # on every take: the requirements alone, not the whole spec
        req = Requirements.model_validate(spec.get("requirements") or {})
        used.setdefault(name, Usage()).add(req, spec.get("gpu_indexes"))
    return used


async def _queued(s, chunk: int = 32):
    """The queued jobs, oldest first: (id, run name, submission time), and the spec. The ids alone are read for
    the whole queue; the specs (JSON to decode and validate) a few at a time, as far as the take looks: a take
    costs little however long the queue is."""
    rows = (await s.execute(
        select(JobRow.job_id, JobRow.run_name, JobRow.submitted_at)
        .where(JobRow.status == JobStatus.SUBMITTED.value, JobRow.runner_name.is_(None))
        .order_by(JobRow.submitted_at)
    )).all()
    for i in range(0, len(rows), chunk):
        some = rows[i:i + chunk]
        specs = dict((await s.execute(select(JobRow.job_id, JobRow.spec).where(  # still queued: not taken meanwhile
            JobRow.job_id.in_([r.job_id for r in some]), JobRow.status == JobStatus.SUBMITTED.value,
            JobRow.runner_name.is_(None)))).all())
        for row in some:
            if row.job_id in specs:
                yield row, JobSpec.model_validate(specs[row.job_id])


async def _try_take(ctx: Context, runner_name: str, port: int | None = None) -> JobSpec | None:
    """The oldest queued job that fits what the runner has free now (backfill: a later job that fits goes ahead
    of one that does not yet), with the GPUs it gets; none while a job that fits the runner but not its free
    part has waited past RESERVE_AFTER (the runner is kept for it, so that a stream of small jobs never starves
    it)."""
    async with ctx.sessions() as s:
        runner = await s.get(RunnerRow, runner_name)
        if runner is None or runner.status not in LIVE_RUNNERS:
            return None
        res = RunnerResources.model_validate(runner.resources)
        placed = await gangs.deliver(s, runner_name)  # placed here with its run's others: given first
        if placed is not None:
            await s.commit()
            return placed
        used = (await usage_of(s, [runner_name])).get(runner_name, Usage())
        async for row, spec in _queued(s):
            if fits(spec, res, runner.labels):
                continue  # never on this runner
            if spec.nodes > 1:  # a multi-node run: all its jobs at once, from its master's place in the queue
                if spec.rank != 0:
                    continue
                given = await gangs.place_run(s, runner, row, await usage_of(s), fits, port)
                if given is None:
                    continue
                await s.commit()
                ctx.signals.notify("jobs")  # the other runners it placed jobs on take them now
                ctx.signals.notify(f"job:{row.job_id}")
                return given
            gpus = place(spec.requirements, res, used)
            if gpus is None:
                if (now() - row.submitted_at).total_seconds() > RESERVE_AFTER:
                    return None  # kept for it
                continue
            spec.gpu_indexes = gpus if res.gpus else None
            taken = await s.execute(
                update(JobRow)
                .where(JobRow.job_id == row.job_id, JobRow.runner_name.is_(None),
                       JobRow.status == JobStatus.SUBMITTED.value)
                .values(runner_name=runner_name, status=JobStatus.PROVISIONING.value, started_at=now(),
                        runner_resources=runner.resources, spec=spec.model_dump(mode="json"), reason=None)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount != 1:
                continue
            runner.job_id = row.job_id
            runner.status = RunnerStatus.BUSY.value
            runner.last_seen_at = now()
            ctx.forget_quiet(runner_name)
            await refresh_run_status(s, row.run_name)
            await s.commit()
            ctx.signals.notify(f"job:{row.job_id}")
            return spec
    return None
