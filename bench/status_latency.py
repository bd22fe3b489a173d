"""`dstack status` on a warm local server whose database holds 10,000 runs (one job each).

The runs are written straight into the server's SQLite database with the server's own table classes
(src/dstack/server/db/tables.py), with the values `submit` and the runner would give them: the job
spec is what the CLI resolves from the project's workflows.yaml (dstack.config.workflows), the code
reference is the project's, statuses are DONE (every 10th FAILED with an exit code and a reason).
Submitting 10,000 runs through the HTTP API would take far longer and measure the same rows.

Cases, interleaved round by round (A B C D, A B C D, ...):
  status        `dstack status`            (last 10 runs, table)
  status-json   `dstack status --json`     (last 10 runs, JSON)
  status-n100   `dstack status -n 100`     (last 100 runs, table)
  floor         `sh -c true`
Also, informative: `dstack status` on the same warm server before the rows were inserted (empty DB),
and `dstack status --all` (all 10,000 runs; a few runs only).
Target: every case median < 0.3 s.
Usage: python bench/status_latency.py [--runs 10000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DSTACK,
    interleaved,
    local_server_home,
    make_project,
    ms,
    print_table,
    run_timed,
    stats,
    verdict,
    write_results,
)

TARGET_S = 0.3
WORKFLOWS = """workflows:
  - name: train
    image: dstack-test/busybox
    commands:
      - python3 train.py --epochs $epochs
    artifacts:
      - checkpoint
    resources:
      memory: 1GB
  - name: prepare
    commands:
      - python3 prepare.py
    artifacts:
      - data
"""
VARIABLES = """variables:
  train:
    epochs: 10
"""


def populate(home: Path, project: Path, n: int) -> dict:
    """n runs (one job each) into the server's database, as `submit` and a runner would leave them."""
    from sqlalchemy import create_engine, insert

    from dstack.api.code_capture import capture
    from dstack.api.repo import repo_id
    from dstack.config.files import ProjectFiles
    from dstack.config.workflows import resolve_workflow
    from dstack.core.names import ADJECTIVES, ANIMALS
    from dstack.server.db.tables import JobRow, RunRow

    rid = repo_id(project)
    files = ProjectFiles.read(project)
    code, _ = capture(project)
    rng = random.Random(42)
    counters: dict[str, int] = {}
    start = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=n + 5)
    runs, jobs = [], []
    for i in range(n):
        base = f"{rng.choice(ADJECTIVES)}-{rng.choice(ANIMALS)}"
        counters[base] = counters.get(base, 0) + 1
        name = f"{base}-{counters[base]}"
        workflow = "train" if i % 3 else "prepare"
        overrides = {"epochs": str(rng.randint(1, 50))} if workflow == "train" and i % 2 else {}
        resolved = resolve_workflow(files, workflow, overrides, name)
        submitted = start + timedelta(minutes=i)
        failed = i % 10 == 0
        status = "FAILED" if failed else "DONE"
        runs.append(dict(name=name, repo_id=rid, workflow=workflow, provider=resolved.provider, status=status,
                         submitted_at=submitted, variables=resolved.variables, overrides=overrides,
                         dependencies=[], code=code.to_dict()))
        for job in resolved.jobs:
            job.code = code
            jobs.append(dict(
                job_id=job.job_id, run_name=name, workflow=workflow, status=status, submitted_at=submitted,
                started_at=submitted + timedelta(seconds=2), finished_at=submitted + timedelta(seconds=40),
                runner_name=f"{rng.choice(ADJECTIVES)}-{rng.choice(ANIMALS)}-1", exit_code=1 if failed else 0,
                reason="exited with code 1" if failed else None, stop_requested=None,
                image_digest=f"sha256:{rng.getrandbits(256):064x}" if job.image else None,
                spec=job.model_dump(mode="json"),
                saved_artifacts=[] if failed else [{"path": a, "manifest": f"{rng.getrandbits(256):064x}", "files": 3,
                                                    "size": 123456} for a in job.artifacts],
            ))
    engine = create_engine(f"sqlite:///{home / 'server' / 'dstack.db'}")
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(insert(RunRow), runs)
        conn.execute(insert(JobRow), jobs)
    engine.dispose()
    return {"runs": len(runs), "jobs": len(jobs), "insert_s": time.perf_counter() - t0, "repo_id": rid}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--all-rounds", type=int, default=1, help="runs of `dstack status --all` (0: skip)")
    a = ap.parse_args()

    with local_server_home("status") as (home, env):
        proj = make_project(home / "project", WORKFLOWS)
        (proj / ".dstack" / "variables.yaml").write_text(VARIABLES)
        subprocess.run(["git", "commit", "-qam", "variables"], cwd=proj, capture_output=True)
        kw = {"cwd": proj, "env": env}
        print(f"DSTACK_HOME={home}; starting the server (schema), empty-DB status...", flush=True)
        run_timed([DSTACK, "status"], **kw)  # starts the server, which creates the schema
        empty = [run_timed([DSTACK, "status"], **kw)[0] for _ in range(5)]
        run_timed([DSTACK, "server", "stop"], env=env)
        os.chdir(proj)  # repo_id / find_project as the CLI sees them
        print(f"inserting {a.runs} runs...", flush=True)
        pop = populate(home, proj, a.runs)
        print(f"  inserted {pop['runs']} runs, {pop['jobs']} jobs in {pop['insert_s']:.1f} s", flush=True)
        run_timed([DSTACK, "status"], **kw)  # server start
        for _ in range(2):
            _, p = run_timed([DSTACK, "status"], **kw)
        listed = p.stdout.decode()
        assert listed.count("DONE") + listed.count("FAILED") >= 20, listed[:2000]  # 10 runs + their jobs
        n100 = run_timed([DSTACK, "status", "-n", "100", "--json"], **kw)[1].stdout
        assert len(json.loads(n100)) == 100
        cases = {
            "status": ([DSTACK, "status"], kw),
            "status-json": ([DSTACK, "status", "--json"], kw),
            "status-n100": ([DSTACK, "status", "-n", "100"], kw),
            "floor": (["sh", "-c", "true"], {}),
        }
        times = interleaved(cases, a.rounds)
        all_times = [run_timed([DSTACK, "status", "--all"], **kw)[0] for _ in range(a.all_rounds)]

    st = {k: stats(v) for k, v in times.items()}
    floor = st["floor"]["median"]
    rows = []
    checks = {}
    for k, label in (("status", "dstack status"), ("status-json", "dstack status --json"),
                     ("status-n100", "dstack status -n 100")):
        m = st[k]["median"]
        rows.append({"measure": f"{label} ({a.runs} runs in DB)", "value": ms(m), "baseline": f"sh -c true: {ms(floor)}",
                     "ratio": f"{m / floor:.0f}x", "target": f"< {TARGET_S} s", "result": verdict(m, TARGET_S)})
        checks[k] = {"value": m, "target_lt": TARGET_S, "pass": m < TARGET_S, "floor_s": floor}
    print(f"\n{a.rounds} interleaved rounds, medians (p25-p75):")
    for k, s in st.items():
        print(f"  {k:12s} {ms(s['median']):>8s}  ({ms(s['p25'])} - {ms(s['p75'])})")
    print(f"  informative: `dstack status` with an empty DB: {ms(statistics.median(empty))} (median of 5); "
          f"`dstack status --all` ({a.runs} runs): "
          f"{ms(statistics.median(all_times)) if all_times else 'skipped'} (median of {len(all_times)})\n")
    print_table(rows, ["measure", "value", "baseline", "ratio", "target", "result"])
    write_results("status_latency", {
        "db_runs": a.runs, "populate": pop, "rounds": a.rounds, "cases": st,
        "informative": {"status_empty_db": stats(empty), "status_all": stats(all_times) if all_times else None},
        "checks": checks,
    })


if __name__ == "__main__":
    main()
