"""Runners on demand, within limits, and their guaranteed teardown.

Each pass (background/loops.py), one at a time, so that no limit is exceeded whatever the submissions:
- `provision`: a queued job that no live runner has room for, nor a runner being started, gets a runner from the
  cheapest offer that fits it and that the backend's limits allow (regions, instance types, spot, price, the most
  instances in all and of each type); a capacity or quota refusal makes it try the next offer. A multi-node run's
  runners are created together, or none. Each queued job says what was done for it, or why nothing could be.
- `teardown`: an instance goes when its runner has gone (exited idle, lost), has been idle past the idle timeout,
  never registered, or is over a lowered limit (idle ones at once; busy ones are drained and go once their jobs
  have ended); a termination is asked again until the backend confirms it.
- `reconcile` (at start, then every backend's `list_interval`): instances that carry this server's tags but
  that it does not know are reported and terminated; those that are gone on their own are marked so.
Every instance is a row of `instances` from the request on (its offer: the price behind runners' and jobs' cost).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from datetime import UTC, datetime

from sqlalchemy import func, select

from dstack.backends.base import Allocations, Bootstrap, CapacityError, Instance, MultiNode, Offer
from dstack.core.backends import Limits
from dstack.core.models import JobSpec, JobStatus, RunnerStatus
from dstack.core.resources import RunnerResources, Usage, place
from dstack.server.context import Context
from dstack.server.db.tables import InstanceRow, JobRow, RunnerRow
from dstack.server.services import runner_tokens
from dstack.server.services.backends import allowed_offers, capacity, forget_removed, limits_of
from dstack.server.services.scheduler import fits, usage_of

log = logging.getLogger("dstack.server")
LIVE = (RunnerStatus.READY.value, RunnerStatus.BUSY.value)
TEARDOWN_EVERY = 2.0  # seconds between teardown passes (and between asking a backend again to terminate)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _offer_json(o: Offer) -> dict:
    return {"instance_type": o.instance_type, "region": o.region, "spot": o.spot, "price": o.price,
            "resources": o.resources.model_dump(mode="json"), "describe": o.describe()}


async def any_live_runner(ctx: Context) -> bool:
    async with ctx.sessions() as s:
        return await s.scalar(select(RunnerRow.name).where(RunnerRow.status.in_(LIVE)).limit(1)) is not None


async def provision(ctx: Context) -> None:
    async with ctx.sessions() as s:
        queued_now = JobRow.status == JobStatus.SUBMITTED.value, JobRow.runner_name.is_(None)
        if not ctx.backends or await s.scalar(select(JobRow.job_id).where(*queued_now).limit(1)) is None:
            ctx.waiting.clear()
            return  # nothing to start a runner for: the pass costs one small query
        # runners first: a job seen queued below was queued while they were as seen here
        live = (await s.scalars(select(RunnerRow).where(RunnerRow.status.in_(LIVE)))).all()
        queued = (await s.execute(select(JobRow.job_id, JobRow.run_name).where(*queued_now)
                                  .order_by(JobRow.submitted_at))).all()
        specs = await _specs(ctx, s, [q.job_id for q in queued])
        instances = (await s.scalars(select(InstanceRow).where(InstanceRow.status.in_(("running", "terminating")))))
        instances = instances.all()
        draining = await runner_tokens.draining(s)
        used = await usage_of(s, [r.name for r in live])
    registered = {r.name for r in live}
    for name, of in list(ctx.starting.items()):  # one that registered ends its backend's failures in a row
        if name in registered:
            del ctx.starting[name]
            ctx.start_failures.pop(of, None)
    # what live runners have free now; a queued job that fits there is taken by one of them
    rooms = [(RunnerResources.model_validate(r.resources), r.labels, used.get(r.name, Usage())) for r in live
             if r.name not in draining]
    # runners being started (not registered yet): each will take one job that its offer fits, which says what
    starting = [(RunnerResources.model_validate(i.offer["resources"]),
                 _provisioning(i.offer, ctx.instance_notes.get((i.backend, i.instance_id)))) for i in instances
                if i.status == "running" and i.runner_name not in registered and i.offer.get("resources")]
    alive = {}  # backend -> instances, (backend, type) -> instances
    for i in instances:
        alive[i.backend] = alive.get(i.backend, 0) + 1
        key = (i.backend, i.offer.get("instance_type"))
        alive[key] = alive.get(key, 0) + 1
    waiting: dict[str, str] = {}
    need: dict[str, list[JobSpec]] = {}  # run -> its jobs that need a new runner (a multi-node run's together)
    for row in queued:
        job = specs.get(row.job_id)
        if job is None:  # taken between the two reads
            continue
        room = next(((u, gpus) for res, labels, u in rooms if not fits(job, res, labels)
                     and (gpus := place(job.requirements, res, u)) is not None), None)
        if room is not None:  # a live runner will take it: its room is counted as taken
            room[0].add(job.requirements, room[1])
            continue
        soon = next((s for s in starting if not fits(job, s[0])), None)
        if soon is not None:
            starting.remove(soon)
            waiting[row.job_id] = soon[1]
            continue
        need.setdefault(row.run_name, []).append(job)
    now = _Pass(ctx, alive)
    for jobs in need.values():
        why = await _start_for(ctx, jobs, now)
        for job in jobs:
            waiting[job.job_id] = why
    ctx.waiting = waiting


async def _specs(ctx: Context, s, job_ids: list[str]) -> dict[str, JobSpec]:
    """The specs of these queued jobs: read and validated once while they are queued (kept in `ctx.queued_specs`:
    a deep queue is not decoded again at every pass)."""
    known = ctx.queued_specs
    missing = [j for j in job_ids if j not in known]
    for i in range(0, len(missing), 500):
        for job_id, spec in (await s.execute(select(JobRow.job_id, JobRow.spec).where(
                JobRow.job_id.in_(missing[i:i + 500])))).all():
            known[job_id] = JobSpec.model_validate(spec)
    ctx.queued_specs = {j: known[j] for j in job_ids if j in known}
    return ctx.queued_specs


class _Pass:
    """What one provision pass knows: each backend's allowed offers (cheapest first; kept between passes while
    the backend's offers and limits are the same objects), and the decisions made for jobs alike (a queue of a
    thousand alike jobs costs one decision, until a runner is started and the counts change)."""

    def __init__(self, ctx: Context, alive: dict):
        self.ctx, self.alive = ctx, alive
        self.decided: dict[tuple, str] = {}

    def offers(self, backend) -> tuple[list[Offer], list[tuple[Offer, str]]]:
        listed, limits = backend.offers(), limits_of(self.ctx, backend.name)
        key = (id(listed), len(listed), limits, capacity(self.ctx, backend))
        cached = self.ctx.offer_cache.get(backend.name)
        if cached is None or cached[0] != key:
            allowed, refused = allowed_offers(self.ctx, backend)
            cached = (key, sorted(allowed, key=lambda o: o.price), refused, listed)  # `listed` kept: its id holds
            self.ctx.offer_cache[backend.name] = cached
        return cached[1], cached[2]


def _key(jobs: list[JobSpec]) -> tuple:
    return tuple((j.requirements.model_dump_json(), bool(j.image)) for j in jobs)


async def _start_for(ctx: Context, jobs: list[JobSpec], now: _Pass) -> str:
    """Start a runner for each of `jobs` (one run's) from the cheapest offer that fits them all and that the
    limits allow for all of them; what was done, or why nothing could be, for the jobs' reason."""
    key = _key(jobs)
    if key in now.decided:
        return now.decided[key]
    k, alive = len(jobs), now.alive
    refusals: list[str] = []
    streams = []
    for backend in ctx.backends:
        _, retry_at, failing = ctx.start_failures.get(backend.name, (0, 0.0, ""))
        if time.monotonic() < retry_at:
            refusals.append(failing)
            continue
        if k > 1 and not isinstance(backend, MultiNode) and backend.name != "local":
            continue
        n = _runners_for(backend, k)
        cap = capacity(ctx, backend)
        if cap and alive.get(backend.name, 0) + n > cap:  # counts first: no offer needs a look
            refusals.append(f"limit of {cap} {backend.name} instance{'s' if cap != 1 else ''} reached")
            continue
        allowed, refused = now.offers(backend)
        fitting = (o for o in allowed if all(not fits(j, o.resources) for j in jobs))
        first = next(fitting, None)
        if first is None:
            refusals += list(itertools.islice((f"{o.describe()}: {why}" for o, why in refused
                                               if all(not fits(j, o.resources) for j in jobs)), 3))
            continue
        streams.append(_within_type_limits(ctx, backend, itertools.chain([first], fitting), n, alive, refusals))
    tries = []
    for offer, backend in heapq.merge(*streams, key=lambda c: c[0].price):  # the cheapest first, found lazily
        n = _runners_for(backend, k)
        try:
            await _create(ctx, backend, offer, jobs[:n], "; ".join(tries))
        except CapacityError as e:
            tries.append(f"{offer.describe()}: {e}")
            log.info("%s refused a runner for %s: %s", backend.name, jobs[0].run_name, e)
            continue
        except Exception as e:  # a backend's failure is the jobs' reason, not the loop's end
            tries.append(f"{offer.describe()}: {e}")
            log.exception("%s could not create a runner", backend.name)
            continue
        alive[backend.name] = alive.get(backend.name, 0) + n
        alive[(backend.name, offer.instance_type)] = alive.get((backend.name, offer.instance_type), 0) + n
        now.decided.clear()  # the counts changed: alike jobs are decided again
        return _provisioning({"describe": offer.describe(), "after": "; ".join(tries)})
    said = tries + [r for r in dict.fromkeys(refusals) if r]
    if not said:
        why = "waiting: no runner has room for it now, and no backend can start one that fits it"
    else:
        why = "waiting: " + "; ".join(said[:4]) + (f" (and {len(said) - 4} more)" if len(said) > 4 else "")
    if not tries:  # a capacity error may pass: only a decision made without one holds for alike jobs
        now.decided[key] = why
    return why


def _runners_for(backend, k: int) -> int:
    """How many runners a run of `k` jobs gets from `backend`: one each, but on `local`, whose runner is this
    whole machine, one (it takes as many of the run's jobs as it has room for; the run is placed once all have
    a place)."""
    return 1 if backend.name == "local" else k


def _within_type_limits(ctx: Context, backend, offers, k: int, alive: dict, refusals: list[str]):
    """(offer, backend) for each of `offers` that the most instances of its type allow."""
    per_type = limits_of(ctx, backend.name).max_per_type
    for o in offers:
        most = per_type.get(o.instance_type or "")
        if most is not None and alive.get((backend.name, o.instance_type), 0) + k > most:
            refusals.append(f"limit of {most} {o.instance_type} reached")
            continue
        yield o, backend


def _provisioning(offer: dict, note: str | None = None) -> str:
    """What a job that a runner is being started for says, as long as it is (the offers tried before too, and
    what the backend says of the instance now)."""
    if not offer.get("describe"):
        said = "a runner is being started for it"
    else:
        said = f"provisioning {offer['describe']}" + (f" (after {offer['after']})" if offer.get("after") else "")
    return f"{said}: {note}" if note else said


def idle_timeout(ctx: Context, backend) -> float:
    """Seconds an idle runner of `backend` lives: its limits', else the backend's own default (slurm: a few
    seconds, an allocation held idle costs the user's share of the cluster), else the server's."""
    idle = limits_of(ctx, backend.name).idle_timeout
    if idle is None:
        idle = getattr(backend, "idle_timeout", None)
    return ctx.settings.runner_idle_timeout if idle is None else idle


async def _create(ctx: Context, backend, offer: Offer, jobs: list[JobSpec], after: str = "") -> list[Instance]:
    """A runner of `offer` for each of `jobs` (one run's), all or none: one request where the backend makes
    allocations (a Slurm job of k nodes), else one each."""
    # tokens of their own, never the admin's: each can do a runner's work and nothing else
    identities = [await runner_tokens.issue(ctx, None, {}, issued_by=backend.name) for _ in jobs]
    idle = idle_timeout(ctx, backend)
    boots = [Bootstrap(server_url=ctx.settings.runner_url, token=i.token, runner_name=i.name, idle_timeout=idle,
                       server_id=ctx.server_id, interruptible=offer.spot, requirements=job.requirements)
             for i, job in zip(identities, jobs, strict=True)]
    made: list[Instance] = []
    try:
        if len(boots) > 1 and isinstance(backend, Allocations):
            made = await asyncio.to_thread(backend.create_group, offer, boots)
        else:
            for b in boots:
                made.append(await asyncio.to_thread(backend.create, offer, b))
    except BaseException:
        for i in identities[len(made):]:
            await runner_tokens.revoke(ctx, i.name)
        for inst, job in zip(made, jobs, strict=False):  # a multi-node run's are all or none
            await _add_instance(ctx, backend, inst, offer, job, after)
            await _mark_terminating(ctx, backend.name, inst.id, "the rest of its run's runners could not be had")
        raise
    for inst, job in zip(made, jobs, strict=True):
        await _add_instance(ctx, backend, inst, offer, job, after)
    return made


async def _add_instance(ctx: Context, backend, inst: Instance, offer: Offer, job: JobSpec, after: str) -> None:
    async with ctx.sessions() as s, s.begin():
        s.add(InstanceRow(backend=backend.name, instance_id=inst.id, runner_name=inst.runner_name,
                          offer={**_offer_json(offer), "for_job": job.job_id, **({"after": after} if after else {})},
                          status="running", created_at=_now()))
    ctx.starting[inst.runner_name] = backend.name
    ctx.started_at[inst.runner_name] = time.monotonic()
    log.info("started %s runner %s for job %s (%s)", backend.name, inst.runner_name, job.job_id, offer.describe())


async def _revoke(ctx: Context, name: str) -> None:
    from dstack.core.errors import NotFound

    try:
        await runner_tokens.revoke(ctx, name)
    except NotFound:  # revoked already
        pass


async def _mark_terminating(ctx: Context, backend: str, instance_id: str, reason: str) -> None:
    async with ctx.sessions() as s, s.begin():
        row = await s.get(InstanceRow, (backend, instance_id))
        if row is not None and row.status == "running":
            row.status, row.reason = "terminating", reason
    ctx.next_teardown = 0.0


async def teardown(ctx: Context) -> None:
    """Terminate the instances that should go, and ask again for those whose termination is not confirmed."""
    if time.monotonic() < ctx.next_teardown:
        return
    ctx.next_teardown = time.monotonic() + TEARDOWN_EVERY
    backends = {b.name: b for b in ctx.backends}
    async with ctx.sessions() as s:
        rows = (await s.scalars(select(InstanceRow).where(InstanceRow.status.in_(("running", "terminating")))
                                .order_by(InstanceRow.created_at.desc()))).all()
        if gone := {n for n in ctx.removed_backends if not any(r.backend == n for r in rows)}:
            await forget_removed(ctx, gone)
        if not rows:
            return
        runners = {r.name: r for r in (await s.scalars(select(RunnerRow).where(
            RunnerRow.name.in_([r.runner_name for r in rows])))).all()}
        busy = set((await s.scalars(select(JobRow.runner_name).where(
            JobRow.runner_name.in_(list(runners)), JobRow.status.in_(_UNFINISHED)))).all())
        last_end = dict((await s.execute(select(JobRow.runner_name, func.max(JobRow.finished_at)).where(
            JobRow.runner_name.in_(list(runners))).group_by(JobRow.runner_name))).all())
        # instances not registered yet whose job has ended (stopped while it waited): a backend that holds a
        # scheduler's allocation for it gives it back (slurm: scancel of a job pending on Resources)
        for_jobs = [r.offer.get("for_job") for r in rows if r.runner_name not in runners and r.offer.get("for_job")
                    and getattr(backends.get(r.backend), "cancels_unneeded", False)]
        ended = set((await s.scalars(select(JobRow.job_id).where(  # ended, or taken by another runner
            JobRow.job_id.in_(for_jobs), JobRow.status != JobStatus.SUBMITTED.value))).all()) if for_jobs else set()
    over = _over_limits(ctx, [r for r in rows if r.status == "running"], backends)
    for row in rows:
        backend = backends.get(row.backend)
        if backend is None:
            continue  # its plug-in is not loaded: it is said in `dstack backends`
        runner = runners.get(row.runner_name)
        why = row.reason if row.status == "terminating" else None
        if why is None and runner is None and row.offer.get("for_job") in ended:
            why = "the job it was started for ended, or another runner took it, before it started"
        if why is None:
            why = _why_go(ctx, backend, row, runner, row.runner_name in busy, last_end.get(row.runner_name),
                          row in over)
        if why == "drain":
            await runner_tokens.drain(ctx, row.runner_name)
            continue
        if why is None:
            continue
        try:
            done = await asyncio.to_thread(backend.terminate, row.instance_id)
        except Exception as e:  # asked again next time
            done = False
            log.warning("terminating %s instance %s failed (asked again): %s", row.backend, row.instance_id, e)
        async with ctx.sessions() as s, s.begin():
            r = await s.get(InstanceRow, (row.backend, row.instance_id))
            if r is None:
                continue
            if r.status == "running":
                log.info("terminating %s instance %s (runner %s): %s", row.backend, row.instance_id,
                         row.runner_name, why)
            r.status, r.reason = ("terminated", why) if done else ("terminating", why)
            if done:
                r.terminated_at = _now()
        if done and runner is not None and runner.status in LIVE:
            from dstack.server.services.runners import terminated

            await terminated(ctx, [row.runner_name])
        if done and runner is None:  # it never registered: its token must not outlive it
            await _revoke(ctx, row.runner_name)


_UNFINISHED = tuple(s.value for s in JobStatus if not s.finished and s != JobStatus.SUBMITTED)
_FINISHED = tuple(s.value for s in JobStatus if s.finished)


def _why_go(ctx: Context, backend, row: InstanceRow, runner: RunnerRow | None, busy: bool,
            last_end: datetime | None, over: bool) -> str | None:
    """Why this instance should go now ("drain": once its jobs end; None: it stays)."""
    if runner is None:
        grace = getattr(backend, "startup_grace", 600.0)
        age = (_now() - row.created_at).total_seconds()
        if age > grace:
            _failed_start(ctx, backend, row.runner_name, f"its runner did not register within {grace:g} s")
            return f"its runner did not register within {grace:g} s"
        return None
    if runner.status not in LIVE:
        return f"its runner is {runner.status.lower()}"
    if over:
        return "drain" if busy else "over the backend's limits"
    if busy:
        return None
    idle = idle_timeout(ctx, backend)
    since = max(x for x in (runner.registered_at, last_end) if x is not None)
    # the runner exits by itself after its idle timeout; this is the backstop, a minute later
    if (_now() - since).total_seconds() > idle + 60:
        return f"idle for more than {idle:g} s"
    return None


def _over_limits(ctx: Context, running: list[InstanceRow], backends: dict) -> set:
    """The instances over their backend's limits now (a limit lowered, a backend disabled or removed): the
    newest first."""
    over = set()
    by_backend: dict[str, list[InstanceRow]] = {}
    for r in running:
        by_backend.setdefault(r.backend, []).append(r)
    for name, rows in by_backend.items():
        backend = backends.get(name)
        cap = capacity(ctx, backend) if backend is not None else 0
        over.update(rows[: max(0, len(rows) - cap)])
        limits: Limits = limits_of(ctx, name)
        for r in rows:
            if limits.refusal(r.offer.get("instance_type"), r.offer.get("region"), bool(r.offer.get("spot")),
                              float(r.offer.get("price") or 0)) is not None:
                over.add(r)
        for itype, most in limits.max_per_type.items():
            of_type = [r for r in rows if r.offer.get("instance_type") == itype]
            over.update(of_type[: max(0, len(of_type) - most)])
    return over


def _failed_start(ctx: Context, backend, name: str, why: str) -> None:
    """A runner the backend started that is gone (or silent) before it registered: the next one is started only
    after a back-off (1, 2, 4 ... 60 s), and queued jobs say why they wait. One that registers ends it."""
    ctx.starting.pop(name, None)
    failures = ctx.start_failures.get(backend.name, (0, 0.0, ""))[0] + 1
    delay = min(60.0, 2.0 ** (failures - 1))
    said = (f"the {backend.name} backend's runner {name} {why} ({failures} in a row; "
            f"{backend.describe_failure(name)}); trying again in {delay:g} s")
    ctx.start_failures[backend.name] = (failures, time.monotonic() + delay, said)
    log.warning("%s", said)


async def reconcile(ctx: Context, force: bool = False) -> None:
    """Compare what each backend lists with what the server knows: an instance with this server's tags that it
    does not know is an orphan (reported, terminated); a known one that is gone is marked so."""
    for backend in list(ctx.backends):
        interval = getattr(backend, "list_interval", 30.0)
        if not force and time.monotonic() - ctx.reconciled.get(backend.name, float("-inf")) < interval:
            continue
        ctx.reconciled[backend.name] = time.monotonic()
        try:
            listed = await asyncio.to_thread(backend.list)
        except Exception as e:  # the next pass asks again
            log.warning("could not list the %s backend's instances: %s", backend.name, e)
            continue
        seen = {i.id: i for i in listed}
        for key in [k for k in ctx.instance_notes if k[0] == backend.name]:
            del ctx.instance_notes[key]
        ctx.instance_notes.update({(backend.name, i.id): i.note for i in listed if i.note})
        async with ctx.sessions() as s:
            rows = (await s.scalars(select(InstanceRow).where(InstanceRow.backend == backend.name,
                                                              InstanceRow.status != "terminated"))).all()
            names = await s.scalars(select(RunnerRow.name).where(RunnerRow.name.in_([r.runner_name for r in rows])))
            registered = set(names.all())
            known = {r.instance_id for r in (await s.scalars(select(InstanceRow).where(
                InstanceRow.backend == backend.name))).all()}
            never = []
            for row in rows:
                if row.instance_id not in seen:
                    if row.runner_name not in registered:
                        never.append(row.runner_name)
                    if row.runner_name not in registered and row.status == "running":
                        _failed_start(ctx, backend, row.runner_name, "exited before it registered")
                    row.status, row.terminated_at = "terminated", _now()
                    row.reason = row.reason or "gone on its own (its runner exited, or the instance was terminated)"
            await s.commit()
        for name in never:  # gone before it registered: its token goes too
            await _revoke(ctx, name)
        for iid, inst in seen.items():
            if iid in known:
                continue
            if getattr(backend, "adopts_unknown", False):  # its own processes, of a server before this one
                async with ctx.sessions() as s, s.begin():
                    s.add(InstanceRow(backend=backend.name, instance_id=iid, runner_name=inst.runner_name,
                                      offer=_offer_json(inst.offer) if inst.offer else {"resources": None},
                                      status="running", created_at=_now()))
                continue
            log.warning("the %s backend has instance %s (runner %s) with this server's tags that the server does "
                        "not know: terminating it", backend.name, iid, inst.runner_name)
            async with ctx.sessions() as s, s.begin():
                s.add(InstanceRow(backend=backend.name, instance_id=iid, runner_name=inst.runner_name,
                                  offer=_offer_json(inst.offer) if inst.offer else {}, status="terminating",
                                  created_at=_now(), reason="an orphan: it carries this server's tags, and the "
                                                            "server did not know it"))
            ctx.next_teardown = 0.0
