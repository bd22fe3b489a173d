"""1,000 trivial jobs over 20 runners, on SQLite and on PostgreSQL: the time from the first submission to the last
job DONE, through a real server and 20 real runners.

Per database: a fresh DSTACK_HOME; the server in the foreground (`python -m dstack.server.main`, no local runners:
DSTACK_MAX_LOCAL_RUNNERS=0); 20 runner tokens (POST /api/runners/tokens, as `dstack runners add` does) and 20
`dstack-runner start --no-docker` processes, each with a DSTACK_HOME and a work folder of its own. Once all 20 are
registered, the jobs are submitted over HTTP (POST /api/runs: a host workflow, `commands: [true]`, no code), 8
requests at a time, as 8 scripts would; the runners take them as they come. Measured:
  wall      first submission -> the last job DONE (what the target is about)
  submit    first submission -> the last one answered
  jobs/s    1,000 / wall
  server    CPU seconds of the server process over the wall time; `db`: of PostgreSQL's processes (its own cluster)
The DONE count is read from the database itself (sqlite3 / psycopg) every 0.2 s, not through the server, so that
watching costs the server nothing. At the end every job must be DONE, each with one runner; how many each runner
ran is reported.

PostgreSQL: a cluster of the benchmark's own (tests/postgres.py: initdb into a temporary folder, a free port of
127.0.0.1), with PostgreSQL's default durability (fsync and synchronous commit on); SQLite is the server's own
(WAL, synchronous=NORMAL).

Target: < 60 s each.
Usage: python bench/many_jobs.py [--jobs 1000] [--runners 20] [--databases sqlite,postgresql] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import BIN, PYTHON, env_for, fresh_home, print_table, verdict, write_results  # noqa: E402

WORKFLOWS = "workflows:\n  - name: t\n    commands: [\"true\"]\n"
TARGET_S = 60.0
SUBMITTERS = 8


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """The process's CPU seconds (user + system); `reaped`: with those of its children that it has reaped, and
    of its live children (PostgreSQL's postmaster reaps the backends of closed connections)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / tick
    if reaped:
        total += (int(fields[13]) + int(fields[14])) / tick + sum(cpu_seconds(c, True) for c in children(pid))
    return total


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


class Counter:
    """Jobs by status, read from the database itself."""

    def __init__(self, url: str):
        self.url = url

    def rows(self, query: str) -> list[tuple]:
        if self.url.startswith("sqlite"):
            path = self.url.split(":///", 1)[1]
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
                return db.execute(query).fetchall()
        import psycopg

        with psycopg.connect(self.url.replace("postgresql+asyncpg://", "postgresql://"), autocommit=True) as db:
            return db.execute(query).fetchall()

    def statuses(self) -> dict[str, int]:
        return dict(self.rows("SELECT status, count(*) FROM jobs GROUP BY status"))


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:g} s")
        time.sleep(0.1)


def measure(database: str, jobs: int, runners: int, keep: bool = False) -> dict:
    import httpx

    home = fresh_home(f"many-{database}")
    env = {**env_for(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    cluster = None
    procs: list[subprocess.Popen] = []
    try:
        if database == "postgresql":
            from tests.postgres import Cluster

            cluster = Cluster.start(fast=False)
            url = cluster.database()
        else:
            url = f"sqlite+aiosqlite:///{home / 'server' / 'dstack.db'}"
        env["DSTACK_DATABASE_URL"] = url
        server = subprocess.Popen([PYTHON, "-m", "dstack.server.main", "--home", str(home)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(home / "server.stderr", "wb"))
        procs.append(server)
        info = home / "server" / "server.json"
        wait_for("the server's start", lambda: info.exists() or server.poll() is not None, 60)
        if server.poll() is not None:
            raise RuntimeError((home / "server.stderr").read_text())
        base = json.loads(info.read_text())["url"]
        http = httpx.Client(base_url=base, timeout=60,
                            headers={"Authorization": f"Bearer {(home / 'server' / 'token').read_text().strip()}"})
        for i in range(runners):
            token = http.post("/api/runners/tokens", json={"name": f"bench-{i}"}).raise_for_status().json()["token"]
            rhome = home / "runners-of-bench" / f"r{i}"
            rhome.mkdir(parents=True)
            (rhome / "token").write_text(token)
            renv = {**env, "DSTACK_HOME": str(rhome)}
            renv.pop("DSTACK_DATABASE_URL")
            procs.append(subprocess.Popen(
                [str(BIN / "dstack-runner"), "start", "--server", base, "--token-file", str(rhome / "token"),
                 "--no-docker", "--workdir", str(rhome / "work")], env=renv, stdout=subprocess.DEVNULL,
                stderr=open(rhome / "runner.log", "wb")))
        wait_for("20 runners registered", lambda: len(http.get("/api/runners").json()) >= runners, 120)
        postmaster = _postmaster_pid(cluster) if cluster else None
        counter = Counter(url)
        time.sleep(2)  # the runners' first heartbeats and long polls settle
        cpu0, db0 = cpu_seconds(server.pid), cpu_seconds(postmaster, True) if postmaster else 0.0
        body = {"repo_id": "bench", "workflow": "t", "files": {".dstack/workflows.yaml": WORKFLOWS}}

        def submit(_):
            r = http.post("/api/runs", json=body)
            r.raise_for_status()
            return r.json()["jobs"][0]["job_id"]

        t0 = time.monotonic()
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            submitted = list(pool.map(submit, range(jobs)))
            t_submitted = time.monotonic() - t0
            while (done := counter.statuses().get("DONE", 0)) < jobs:
                others = {k: v for k, v in counter.statuses().items() if k not in ("DONE",)}
                if any(k in others for k in ("FAILED", "ABORTED", "STOPPED")):
                    raise RuntimeError(f"jobs that did not end DONE: {others}")
                if time.monotonic() - t0 > 600:
                    raise RuntimeError(f"{done} of {jobs} DONE after 600 s: {others}")
                time.sleep(0.2)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(server.pid) - cpu0
        db_cpu = cpu_seconds(postmaster, True) - db0 if postmaster else 0.0
        rows = counter.rows("SELECT job_id, status, runner_name FROM jobs")
        assert sorted(r[0] for r in rows) == sorted(submitted) and all(r[1] == "DONE" and r[2] for r in rows)
        per_runner: dict[str, int] = {}
        for _, _, runner in rows:
            per_runner[runner] = per_runner.get(runner, 0) + 1
        return {"database": database, "jobs": jobs, "runners": runners, "wall_s": round(wall, 2),
                "submit_s": round(t_submitted, 2), "jobs_per_s": round(jobs / wall, 1),
                "server_cpu_s": round(cpu, 1), "db_cpu_s": round(db_cpu, 1) if cluster else None,
                "per_runner": dict(sorted(per_runner.items())), "verdict": verdict(wall, TARGET_S)}
    finally:
        for p in reversed(procs):  # the runners first, then the server
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if cluster is not None:
            cluster.stop()
        if not keep:
            subprocess.run(["rm", "-rf", str(home)])
        else:
            print(f"kept {home}")


def _postmaster_pid(cluster) -> int:
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--runners", type=int, default=20)
    ap.add_argument("--databases", default="sqlite,postgresql")
    ap.add_argument("--keep", action="store_true", help="keep the DSTACK_HOME (server and runner logs)")
    a = ap.parse_args()
    load_before = os.getloadavg()
    results = [measure(db, a.jobs, a.runners, a.keep) for db in a.databases.split(",")]
    print_table([{**r, "per_runner": f"{min(r['per_runner'].values())}..{max(r['per_runner'].values())} "
                                     f"({len(r['per_runner'])} runners)"} for r in results],
                ["database", "jobs", "runners", "wall_s", "submit_s", "jobs_per_s", "server_cpu_s", "db_cpu_s",
                 "per_runner", "verdict"])
    write_results("many_jobs", {"target_s": TARGET_S, "load_before": load_before, "results": results})


if __name__ == "__main__":
    main()
