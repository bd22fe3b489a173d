"""The autoscaler's decision with a deep queue: one `services/autoscaler.provision` pass over 1,000 queued jobs
(1,000 runs of one job each, as 1,000 `dstack run`s make) and 10 backends' offers, in this process, on a real
server context (SQLite database of a fresh DSTACK_HOME, migrated as the server migrates it).

The backends are real objects, made as the server makes them (`services/backends.build`, the plug-in registry):
  local (max_runners 2), docker and docker-2 (the local Docker Engine: one offer each), aws-1 .. aws-7 (the aws
  backend on a catalogue folder of its own: an aws.csv in gpuhunt's format, --types instance types (a third of
  them with NVIDIA GPUs) in 8 regions, on-demand and spot; each backend given 4 of the regions, so about
  --types x 8 offers each). No AWS API is called: offers come from the folder, and nothing is created.
Limits (as `dstack limits set` keeps them): every backend at most 2 instances (`--limits zero`: no instance, and
the limits lowered to 0 once the jobs are queued), aws-2 a price cap of $2/h, aws-3 spot only, aws-4 two instance
types only. Every backend has its 2 instances already (rows of `instances`, status
running, their runners not registered yet): the steady state of a long queue, where each pass must decide for
every queued job that nothing more may be started. So `create()` is never reached (the script checks it), and the
figure is the decision alone: the pass's reads (queued jobs, runners, instances), each job's spec, the offers the
limits allow, and for each run the offers that fit it and the limits that refuse them.

The queued jobs are of three kinds, a third each: `echo` (no resources asked), 4 CPUs and 16 GB, and one GPU of
24 GB. Three runs are submitted through the services (`runs.run_workflow`: resolved from a workflows.yaml as the
CLI sends it, checked against the offers); the other 997 are inserted with the same code (`runs._insert`), each a
run of its own with one of those specs.

Baseline, in the same rounds (A B A B): the pass's first read alone, every queued job's row with its spec decoded
(the query provision runs), on the same database: what any decision over 1,000 queued jobs reads.
Target: the pass < 50 ms (median).

    .venv/bin/python bench/autoscaler_decision.py [--jobs 1000] [--rounds 7] [--types 200] [--limits at-max|zero]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fresh_home, ms, print_table, stats, verdict, write_results  # noqa: E402

TARGET_S = 0.050
REGIONS = ["us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-south-1",
           "ap-northeast-1"]
HEADER = "instance_name,location,price,cpu,memory,gpu_count,gpu_name,gpu_memory,spot,disk_size,gpu_vendor,flags," \
         "cpu_arch,provider_data"
WORKFLOWS = """\
workflows:
  - name: small
    commands: [echo hi]
  - name: big
    commands: [echo big]
    resources: {cpu: 4, memory: 16GB}
  - name: gpu
    commands: [nvidia-smi]
    resources: {gpu: {count: 1, memory: 24GB}}
"""


def catalogue(folder: Path, types: int, seed: int = 7) -> int:
    """An aws.csv of `types` instance types in every region, on-demand and spot: its row count."""
    rng = random.Random(seed)
    rows = [HEADER]
    for t in range(types):
        family = rng.choice(["m6i", "c6i", "r6i", "t3", "g5", "g4dn", "p3"]) if t % 3 else rng.choice(["g5", "g4dn"])
        cpu = rng.choice([2, 4, 8, 16, 32, 64])
        memory = cpu * rng.choice([2, 4, 8])
        gpus, gpu_name, gpu_mem = (rng.choice([1, 4, 8]), rng.choice(["A10G", "T4", "V100"]), 24.0) \
            if family in ("g5", "g4dn", "p3") else (0, "", "")
        if gpus:
            gpu_mem = {"A10G": 24.0, "T4": 16.0, "V100": 16.0}[gpu_name]
        base = 0.02 * cpu + 0.6 * gpus
        for region in REGIONS:
            price = round(base * rng.uniform(0.9, 1.2), 4)
            for spot in (False, True):
                rows.append(f"{family}.t{t},{region},{price * (0.35 if spot else 1):.4f},{cpu},{memory:.1f},{gpus},"
                            f"{gpu_name},{gpu_mem},{spot},,{'nvidia' if gpus else ''},,x86,{{}}")
    (folder / "aws.csv").write_text("\n".join(rows) + "\n")
    return len(rows) - 1


async def setup(home: Path, jobs: int, types: int, zero: bool = False):
    from dstack.backends.registry import backend_class
    from dstack.core.backends import Limits
    from dstack.core.models import RunRequest
    from dstack.server.context import Context, Settings
    from dstack.server.db.session import make_engine, make_sessionmaker, migrate
    from dstack.server.db.tables import InstanceRow
    from dstack.server.services import backends as backend_service
    from dstack.server.services import jobs as job_service
    from dstack.server.services import runs
    from dstack.server.services.autoscaler import _now, _offer_json
    from dstack.server.services.code import CodeBlobs
    from dstack.server.services.secrets import Sealer, server_id
    from dstack.storage.blobstore import open_store

    url = f"sqlite+aiosqlite:///{home / 'dstack.db'}"
    await asyncio.to_thread(migrate, url)
    engine = make_engine(url)
    settings = Settings(home=home, db_url=url, token="t")
    (home / "server").mkdir(parents=True, exist_ok=True)
    local = backend_class("local")(settings.runners_dir, 2)
    ctx = Context(settings=settings, sessions=make_sessionmaker(engine), store=open_store(settings.store_config),
                  code=CodeBlobs(home / "server" / "code"), backends=[local], sealer=Sealer(home / "server"),
                  server_id=server_id(home / "server"))
    job_service.ensure_dirs(ctx)
    folder = home / "catalogue"
    folder.mkdir()
    rows = catalogue(folder, types)
    for name in ("docker", "docker-2"):
        ctx.backends.append(backend_service.build(ctx, name, "docker", {"max_runners": 10}))
    for i in range(1, 8):
        regions = [REGIONS[(i + k) % len(REGIONS)] for k in range(4)]
        ctx.backends.append(backend_service.build(ctx, f"aws-{i}", "aws", {
            "catalog_dir": str(folder), "regions": regions, "access_key_id": "AKIABENCHNOTAKEY0001",
            "secret_access_key": "not-a-secret"}))
    special = {"aws-2": {"max_price": 2.0}, "aws-3": {"spot": "spot"}}
    for b in ctx.backends:
        limits = {"max_total": 2, **special.get(b.name, {})}
        if b.name == "aws-4":
            limits["instance_types"] = sorted({o.instance_type for o in b.offers()})[:2]
        ctx.limits[b.name] = Limits.model_validate(limits)
    created = []
    for b in ctx.backends:  # nothing is ever created: say so if the pass tries
        def refuse(offer, bootstrap, name=b.name):
            created.append(name)
            raise AssertionError(f"{name}.create() was reached: the benchmark's backends are at their limits")
        b.create = refuse
    offers = {b.name: len(b.offers()) for b in ctx.backends}

    # three runs through the services, as `dstack run` submits them; then the rest inserted with their specs
    specs = []
    for workflow in ("small", "big", "gpu"):
        run = await runs.run_workflow(ctx, RunRequest(repo_id="bench", workflow=workflow,
                                                      files={".dstack/workflows.yaml": WORKFLOWS}))
        specs.append(run.jobs[0].spec)
    async with ctx.sessions() as s:
        for i in range(jobs - 3):
            spec = specs[i % 3].model_copy(update={"job_id": f"{i:012x}", "run_name": f"queued-{i}"})
            sub = runs.RunSubmission(run_name=f"queued-{i}", repo_id="bench", workflow=spec.workflow,
                                     provider="bash", jobs=[spec])
            await runs._insert(s, sub, [])
            if i % 200 == 199:
                await s.commit()
        for b in ctx.backends if not zero else ():  # each at its limit: 2 instances, their runners not registered
            offer = next(o for o in b.offers() if not o.resources.gpus)
            for k in range(2):
                s.add(InstanceRow(backend=b.name, instance_id=f"{b.name}-i{k}", runner_name=f"{b.name}-r{k}",
                                  offer=_offer_json(offer), status="running", created_at=_now()))
        await s.commit()
    if zero:  # lowered to 0 once the jobs were queued (a submission that nothing may run fails at once)
        for b in ctx.backends:
            ctx.limits[b.name] = ctx.limits[b.name].model_copy(update={"max_total": 0})
    return ctx, engine, {"catalogue_rows": rows, "offers": offers}, created


async def baseline_read(ctx) -> int:
    from sqlalchemy import select

    from dstack.core.models import JobStatus
    from dstack.server.db.tables import JobRow

    async with ctx.sessions() as s:
        rows = (await s.scalars(select(JobRow).where(JobRow.status == JobStatus.SUBMITTED.value,
                                                     JobRow.runner_name.is_(None))
                                .order_by(JobRow.submitted_at))).all()
        return len([r.spec for r in rows])


async def main_async(args) -> None:
    from dstack.server.services import autoscaler

    home = fresh_home("autoscaler")
    t0 = time.monotonic()
    ctx, engine, info, created = await setup(home, args.jobs, args.types, zero=args.limits == "zero")
    print(f"set up in {time.monotonic() - t0:.1f} s: {args.jobs} queued jobs; catalogue {info['catalogue_rows']} rows;"
          f" offers per backend {info['offers']}")
    assert await baseline_read(ctx) == args.jobs

    # the parts of one pass, timed by wrapping what provision calls
    spent = {"allowed_offers": 0.0, "_start_for": 0.0}
    calls = {"allowed_offers": 0, "_start_for": 0}
    real_allowed, real_start_for = autoscaler.allowed_offers, autoscaler._start_for

    def timed_allowed(*a, **kw):
        t = time.perf_counter()
        try:
            return real_allowed(*a, **kw)
        finally:
            spent["allowed_offers"] += time.perf_counter() - t
            calls["allowed_offers"] += 1

    async def timed_start_for(*a, **kw):
        t = time.perf_counter()
        try:
            return await real_start_for(*a, **kw)
        finally:
            spent["_start_for"] += time.perf_counter() - t
            calls["_start_for"] += 1

    t0 = time.perf_counter()
    await autoscaler.provision(ctx)  # warm: the catalogue read, the statements compiled, the queued specs decoded
    print(f"first pass (the catalogues read, 1,000 specs decoded and kept): {(time.perf_counter() - t0) * 1000:.0f} ms",
          flush=True)
    assert not created
    waiting = dict(ctx.waiting)
    reasons = {}
    for why in waiting.values():
        reasons[why] = reasons.get(why, 0) + 1

    passes, reads = [], []
    for i in range(args.rounds):
        for case in (("pass", "read") if i % 2 == 0 else ("read", "pass")):
            await asyncio.sleep(0.2)
            t = time.perf_counter()
            if case == "pass":
                await autoscaler.provision(ctx)
                passes.append(time.perf_counter() - t)
            else:
                await baseline_read(ctx)
                reads.append(time.perf_counter() - t)
        print(f"round {i + 1}: pass {ms(passes[-1])}, read {ms(reads[-1])}", flush=True)
    assert not created and len(ctx.waiting) == args.jobs

    autoscaler.allowed_offers, autoscaler._start_for = timed_allowed, timed_start_for
    t = time.perf_counter()
    await autoscaler.provision(ctx)
    instrumented = time.perf_counter() - t
    autoscaler.allowed_offers, autoscaler._start_for = real_allowed, real_start_for
    out = io.StringIO()
    if not args.no_profile:
        profile = cProfile.Profile()
        profile.enable()
        await autoscaler.provision(ctx)
        profile.disable()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(12)
    await engine.dispose()
    shutil.rmtree(home, ignore_errors=True)

    p, r = statistics.median(passes), statistics.median(reads)
    where = "at their limits" if args.limits == "at-max" else "limited to 0"
    rows = [{"case": f"provision pass ({args.jobs} queued, 10 backends {where})", "median": ms(p),
             "p25-p75": f"{ms(stats(passes)['p25'])}-{ms(stats(passes)['p75'])}", "vs read": f"{p / r:.1f}x",
             "target": f"< {TARGET_S * 1000:.0f} ms", "result": verdict(p, TARGET_S)},
            {"case": "baseline: the queued jobs' rows read", "median": ms(r),
             "p25-p75": f"{ms(stats(reads)['p25'])}-{ms(stats(reads)['p75'])}"}]
    print()
    print_table(rows, ["case", "median", "p25-p75", "vs read", "target", "result"])
    rest = instrumented - spent["allowed_offers"] - spent["_start_for"]
    print(f"\none pass, instrumented: {ms(instrumented)}: allowed_offers {ms(spent['allowed_offers'])} "
          f"({calls['allowed_offers']} calls), _start_for {ms(spent['_start_for'])} ({calls['_start_for']} calls: "
          f"the offers that fit each run, and the limits), the rest (reads, specs, rooms) {ms(rest)}")
    print("what the queued jobs were told: " + "; ".join(f"{n} x {why[:120]}" for why, n in reasons.items()))
    if not args.no_profile:
        print("\nprofile of one pass (by own time):\n" + "\n".join(out.getvalue().splitlines()[:40]))
    write_results("autoscaler_decision" + ("" if args.limits == "at-max" else "_zero"), {
        "jobs": args.jobs, "rounds": args.rounds, "types": args.types, "limits": args.limits, **info,
        "pass_s": stats(passes), "read_s": stats(reads), "ratio": p / r,
        "instrumented_pass_s": instrumented, "parts_s": spent, "calls": calls, "reasons": reasons,
        "target": {"value": p, "target_lt": TARGET_S, "pass": p < TARGET_S}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--types", type=int, default=200, help="instance types in the catalogue (x 8 regions x 2)")
    ap.add_argument("--limits", choices=["at-max", "zero"], default="at-max",
                    help="every backend at its limit of 2 instances (default), or limited to 0 instances")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled pass at the end")
    args = ap.parse_args()
    os.environ.setdefault("DSTACK_MAX_LOCAL_RUNNERS", "2")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
