"""Slurm cold start (issue 16): from `dstack run` to the job's first output when no runner is up, through the
`slurm` backend, with the runner's virtual environment already installed on the cluster's shared filesystem
(dir/venv, kept between allocations), as a ratio to `sbatch --wrap 'echo hi'` until its output file has the line.
Target: under 2x (median against median).

The cluster is real, as in tests/e2e/test_slurm_backend.py: Debian's Slurm on this machine (tests/slurm.py's
`Slurm`: munged, slurmctld and slurmd n1, n2 in a scratch folder, free ports, SLURM_CONF), a `dstack server` on
loopback (tests/dstack_server.py: no local runners; it inherits SLURM_CONF), the backend added with the CLI
(`dstack backends add slurm --set partition=debug --set dir=/tmp/dstack-bench-slurm-<hex>`; the backend's idle
runners exit after 5 s). One warm-up run installs the venv into dir/venv (not measured). Before each measured
command the script waits until no Slurm job is in squeue and `dstack backends --json` counts 0 instances for
slurm, then pauses 1 s: each measured `dstack run` submits a batch job and starts a runner in it, and neither case
shares the machine with the other's leftovers.

Pairs, A then B:
  A  `dstack run first` (a git project; `commands: [echo first-output, ...]`): from spawning the CLI to the line
     `first-output` in its stdout+stderr (read as it streams)
  B  `sbatch --parsable -o FILE --wrap 'echo hi'`: from spawning it until FILE holds the line `hi` (polled every
     10 ms)

Where A's time goes, per run, on one clock (the cluster's nodes are this machine): the job's `submitted_at`;
slurmctld's log: the batch job received (`_slurm_rpc_submit_batch_job`) and allocated (`sched: Allocate`);
the server log's `slurm: job N for runner NAME` (sbatch returned: create() is done); slurmd's `Launching batch job
N`; the start of the batch script (slurm_script), of the runner's node script (dir/slurm/NAME.sh, started by
`srun`) and of its `dstack-runner` process (/proc start times, 10 ms ticks, read while the runner is up); the
runner log's `registered as NAME` (dir/slurm/NAME.log); the job's `started_at` (taken); the first output at the
CLI. Slurm logs with milliseconds, the server and runner with milliseconds, /proc in 10 ms ticks. Also, alone on
this machine (the node), what the bootstrap's and runner's pieces cost (medians of 5), and Slurm's allocation to
its launch of a batch job with `--export=NONE` (as the runners' jobs) and without it (medians of 3).

The code measured is a copy of src/dstack taken as the script starts (run again with the copy first on
PYTHONPATH, as bench/cold_start.py does): the wheel the runner's venv is installed from follows dstack's files,
and another session's edit in the middle would make a measured run reinstall the venv. Must run as root (munged
as its user, slurmd). Everything started is stopped at the end, also on Ctrl-C, SIGTERM or failure: the server,
the Slurm jobs, the cluster's daemons and scratch folder, the backend's dir.

    .venv/bin/python bench/slurm_cold.py [--pairs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cold import (  # noqa: E402
    SNAPSHOT_ENV,
    first_line,
    log_ts,
    machine_activity,
    pids_with,
    proc_started,
    run_on_a_snapshot,
    snapshot_hash,
    ts,
)
from _common import REPO, env_for, fresh_home, make_project, ms, print_table, stats, verdict, write_results  # noqa: E402

MARKER = "first-output"
WORKFLOWS = f"workflows:\n  - name: first\n    commands:\n      - echo {MARKER}\n      - echo done\n"
TARGET = 2.0  # median(A) / median(B) under this
POLL = 0.01


def sbatch_until(out: Path, wrap: str, env: dict, timeout: float = 60) -> tuple[float, str, float, float]:
    """Seconds from spawning `sbatch --parsable -o OUT --wrap WRAP` until OUT holds the line `hi`; the job id; the
    wall clock at the spawn and when the line was seen."""
    t0, wall0 = time.perf_counter(), time.time()
    p = subprocess.Popen(["sbatch", "--parsable", "-o", str(out), "--wrap", wrap], env=env, cwd=out.parent,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while True:
        try:
            if "hi" in out.read_text().splitlines():
                dt, wall = time.perf_counter() - t0, time.time()
                break
        except OSError:
            pass
        if p.poll() not in (None, 0) or time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"sbatch --wrap {wrap!r}: exited {p.poll()}, no `hi` in {out} after "
                               f"{time.perf_counter() - t0:.1f} s: {p.stderr.read().decode(errors='replace')}")
        time.sleep(POLL)
    job = p.communicate(timeout=30)[0].decode().strip().split(";")[0]
    return dt, job, wall0, wall


def _slurm_ts(text: str) -> float:
    """A Slurm log time (local time, `2026-12-05T01:44:26.123`) as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def _last(pattern: str, text: str, parse) -> float | None:
    found = re.findall(pattern, text, re.M)
    return parse(found[-1]) if found else None


class Bench:
    def __init__(self) -> None:
        self.tmp = fresh_home("slurm")
        self.dir = f"/tmp/dstack-bench-slurm-{secrets.token_hex(4)}"  # the cluster's "shared filesystem"
        self.cluster = self.server = None
        self.conf_before = os.environ.get("SLURM_CONF")

    def start(self) -> None:
        """The cluster, the server and the backend (close() stops whatever of them was started)."""
        from tests.dstack_server import Server
        from tests.slurm import Slurm

        self.cluster = Slurm()
        self.cluster.start()
        os.environ["SLURM_CONF"] = str(self.cluster.conf)  # for the server (it inherits it), sbatch, squeue
        print(f"Slurm cluster up in {self.cluster.startup_s:.1f} s ({self.cluster.folder})", flush=True)
        (self.tmp / "home").mkdir()
        self.server = Server(self.tmp / "home")
        self.server_log = Path(self.server.log.name)
        self.env = {**env_for(self.tmp / "client"), "DSTACK_SERVER_URL": self.server.url,
                    "DSTACK_TOKEN": self.server.token}
        self.project = make_project(self.tmp / "proj", WORKFLOWS)
        self.out = self.tmp / "sbatch"
        self.out.mkdir()
        print(self.cli("backends", "add", "slurm", "--set", f"partition={self.cluster.partition}", "--set",
                       f"dir={self.dir}").strip(), flush=True)

    def cli(self, *args: str) -> str:
        p = subprocess.run([str(Path(sys.executable).parent / "dstack"), *args], cwd=self.project, env=self.env,
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"dstack {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}\n"
                               f"{self.server.log_text()}")
        return p.stdout

    def run(self, on_marker=None) -> tuple[float, float, str]:
        return first_line([str(Path(sys.executable).parent / "dstack"), "run", "first"], MARKER, cwd=self.project,
                          env=self.env, on_marker=on_marker)

    def sbatch_echo(self) -> tuple[float, dict]:
        """B, and where its time went (from the Slurm logs)."""
        dt, job, wall0, wall = sbatch_until(self.out / f"{secrets.token_hex(4)}.out", "echo hi", self.env)
        time.sleep(0.2)  # slurmd's log line is written by then
        ctld, slurmd = self.slurm_logs()
        j = re.escape(job)
        points = {"sbatch_spawned": wall0,
                  "slurmctld_got_job": _last(rf"^\[(\S+)\] _slurm_rpc_submit_batch_job: JobId={j} ", ctld, _slurm_ts),
                  "allocated": _last(rf"^\[(\S+)\] sched\S*: Allocate JobId={j} ", ctld, _slurm_ts),
                  "slurmd_launching": _last(rf"^\[(\S+)\] Launching batch job {j} ", slurmd, _slurm_ts),
                  "output_seen": wall}
        return dt, {"slurm_job": job, "points": points}

    def slurm_logs(self) -> tuple[str, str]:
        folder = self.cluster.folder
        return ((folder / "slurmctld.log").read_text(errors="replace"),
                "".join((folder / f"slurmd-{n}.log").read_text(errors="replace") for n in self.cluster.nodes))

    def instances(self) -> int:
        found = json.loads(self.cli("backends", "--json"))
        return next(b["instances"] for b in found if b["name"] == "slurm")

    def wait_cold(self, timeout: float = 90) -> float:
        """Until no Slurm job is in squeue (ours or the baseline's) and the server counts 0 instances: seconds."""
        t0 = time.monotonic()
        while self.cluster.jobs() or self.instances() != 0:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"still busy after {timeout} s: squeue {self.cluster.jobs()}; "
                                   f"{self.cli('backends')}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def processes_now(self) -> dict:
        """Start times of the batch script, the node's runner script and dstack-runner (read while it is up)."""
        out = {}
        for key, texts in (("batch_script", ("srun", "--kill-on-bad-exit=0")),  # the batch script, exec'd into srun
                           ("node_script", (f"sh\0{self.dir}/slurm/", ".sh")),  # not srun's (names it)
                           ("dstack_runner", (f"{self.dir}/venv/bin/dstack-runner",))):
            starts = [t for t in map(proc_started, pids_with(*texts)) if t is not None]
            out[key] = min(starts) if starts else None
        return out

    def breakdown(self, t_cli: float, wall: float, procs: dict) -> dict:
        http = self.server.admin
        repo_id = json.loads(self.cli("status", "--all", "--json"))[0]["repo_id"]
        job = http.get("/api/runs", params={"repo_id": repo_id, "limit": 1}).json()[0]["jobs"][0]
        name = job["runner"]
        server_log = self.server_log.read_text(errors="replace")
        m = re.findall(rf"^(\S+ \S+) INFO dstack\.server: slurm: job (\d+) for runner {re.escape(name)} ", server_log,
                       re.M)
        slurm_job = m[-1][1] if m else None
        ctld, slurmd = self.slurm_logs()
        runner_log = Path(f"{self.dir}/slurm/{name}.log").read_text(errors="replace")
        j = re.escape(slurm_job or "-")
        taken = job.get("started_at")
        points = [
            ("cli_spawned", t_cli), ("submitted", ts(job["submitted_at"])),
            ("slurmctld_got_job", _last(rf"^\[(\S+)\] _slurm_rpc_submit_batch_job: JobId={j} ", ctld, _slurm_ts)),
            ("sbatch_returned", log_ts(m[-1][0]) if m else None),
            ("allocated", _last(rf"^\[(\S+)\] sched\S*: Allocate JobId={j} ", ctld, _slurm_ts)),
            ("slurmd_launching", _last(rf"^\[(\S+)\] Launching batch job {j} ", slurmd, _slurm_ts)),
            ("batch_script_started", procs.get("batch_script")),
            ("srun_step_launch", _last(rf"^\[(\S+)\] launch task StepId={j}\.0 ", slurmd, _slurm_ts)),
            ("node_script_started", procs.get("node_script")),
            ("dstack_runner_started", procs.get("dstack_runner")),
            ("registered", _last(rf"^(\S+ \S+) INFO registered as {re.escape(name)} ", runner_log, log_ts)),
            ("job_taken", ts(taken) if taken else None), ("first_output", wall)]
        job_lines = [line for line in (ctld + slurmd).splitlines()
                     if re.search(rf"(JobId={j}\b|job {j}\b|StepId={j}\.|\[{j}\.)", line)]
        return {"runner": name, "slurm_job": slurm_job, "points": dict(points), "slurm_log": job_lines[:40]}

    def node_parts(self) -> dict:
        """What the bootstrap's and runner's pieces cost alone on this machine (the node): medians of 5."""
        d = self.dir
        imports = ("import httpx, dstack.runner.main, dstack.runner.client, dstack.runner.daemon; "
                   "from dstack.runner.resources import detect_resources")
        # the runner's environment: sbatch --export=NONE, PATH as the batch script sets it
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "SLURM_CONF": str(self.cluster.conf)}
        py = shutil.which("python3", path=env["PATH"]) or "python3"
        cases = {
            "sh -c true": ["sh", "-c", "true"],
            f"{py} -c version check": [py, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
            f"{py} with the installer's imports": [py, "-c", "import fcntl, glob, hashlib, json, os, platform, re, "
                                                   "shutil, subprocess, sys, tempfile, time, urllib.error, "
                                                   "urllib.request"],
            f"{py}: the installer's imports + GET /api/wheels (admin's token)": [py, "-c", (
                "import fcntl, glob, hashlib, json, os, platform, re, shutil, subprocess, sys, tempfile, time, "
                "urllib.error, urllib.request; json.load(urllib.request.urlopen(urllib.request.Request("
                f"{self.server.url + '/api/wheels'!r}, headers={{'Authorization': 'Bearer {self.server.token}'}})))")],
            "venv python -c pass": [f"{d}/venv/bin/python", "-c", "pass"],
            "venv: import dstack.runner.main": [f"{d}/venv/bin/python", "-c", "import dstack.runner.main"],
            "venv: the runner's imports": [f"{d}/venv/bin/python", "-c", imports],
            "venv: the imports + detect_resources()": [f"{d}/venv/bin/python", "-c", imports + "; detect_resources()"],
        }
        out = {}
        for label, argv in cases.items():
            xs = []
            for _ in range(5):
                t0 = time.perf_counter()
                rc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                xs.append(time.perf_counter() - t0)
            out[label] = statistics.median(xs) if rc == 0 else None  # failed: not a figure
        # Slurm's allocation to slurmd's launch of the batch job, by how the job's environment is given: --export=NONE
        # (the runner's jobs: Slurm then loads the user's login environment on the node, as --get-user-env), or
        # the default (ALL) from sbatch run in a scrubbed environment
        clean = {"PATH": env["PATH"], "HOME": "/root", "SLURM_CONF": str(self.cluster.conf)}
        for label, extra, e in (("allocated to launching, sbatch --export=NONE", ["--export=NONE"], self.env),
                                ("allocated to launching, env -i ... sbatch (--export=ALL)", [], clean)):
            xs = []
            for _ in range(3):
                self.wait_cold()
                job = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *extra, "--wrap", "true"], env=e,
                                     capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
                deadline = time.monotonic() + 30
                while True:
                    ctld, slurmd = self.slurm_logs()
                    a = _last(rf"^\[(\S+)\] sched\S*: Allocate JobId={job} ", ctld, _slurm_ts)
                    b = _last(rf"^\[(\S+)\] Launching batch job {job} ", slurmd, _slurm_ts)
                    if (a and b) or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                if a and b:
                    xs.append(b - a)
            out[label] = statistics.median(xs) if xs else None
        return out

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.cluster is not None:
            self.cluster.stop()  # cancels every job left, stops the daemons, kills what is left, removes the folder
        if self.conf_before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self.conf_before
        for pid in pids_with(self.dir):  # anything of the backend's dir left
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


STAGES = [("CLI start to run submitted", "cli_spawned", "submitted"),
          ("decide + sbatch, to slurmctld has it", "submitted", "slurmctld_got_job"),
          ("slurmctld: received to allocated", "slurmctld_got_job", "allocated"),
          ("allocated to slurmd launching", "allocated", "slurmd_launching"),
          ("slurmd launching to batch script", "slurmd_launching", "batch_script_started"),
          ("batch script to srun's step launched", "batch_script_started", "srun_step_launch"),
          ("srun's step to node script", "srun_step_launch", "node_script_started"),
          ("bootstrap (version + venv check)", "node_script_started", "dstack_runner_started"),
          ("runner start + register", "dstack_runner_started", "registered"),
          ("register to job taken", "registered", "job_taken"),
          ("taken to first output", "job_taken", "first_output"),
          ("(info: submitted to sbatch returned)", "submitted", "sbatch_returned"),
          ("(info: submitted to batch script)", "submitted", "batch_script_started")]
B_STAGES = [("sbatch to slurmctld has it", "sbatch_spawned", "slurmctld_got_job"),
            ("slurmctld: received to allocated", "slurmctld_got_job", "allocated"),
            ("allocated to slurmd launching", "allocated", "slurmd_launching"),
            ("launching to the line seen", "slurmd_launching", "output_seen")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=7)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("slurm_cold.py starts munged and slurmd: run it as root")
    run_on_a_snapshot(__file__)
    sys.path.insert(0, str(REPO))  # tests.slurm, tests.dstack_server

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    before = machine_activity()
    print(f"before: {before['uptime']}\n  busiest: {'; '.join(before['top_cpu'])}", flush=True)
    bench = None
    a_times: list[float] = []
    b_times: list[float] = []
    parts: list[dict] = []
    b_parts: list[dict] = []
    waited: list[float] = []
    try:
        bench = Bench()
        bench.start()
        t0 = time.monotonic()
        dt, _, out = bench.run()  # warm-up: the server's first run, the wheelhouse, the venv on the "cluster"
        print(f"warm-up run (installs {bench.dir}/venv): first output after {dt:.1f} s, "
              f"{time.monotonic() - t0:.1f} s in all", flush=True)
        logs = " ".join(p.read_text(errors="replace") for p in Path(f"{bench.dir}/runners").glob("*.log"))
        installed = re.findall(r"installed dstack \S+ into \S+ in [\d.]+s", logs)
        if installed:
            print(f"  runner log: {installed[-1]}")
        bench.wait_cold()
        bench.sbatch_echo()  # warm-up of the baseline
        for i in range(args.pairs):
            waited.append(bench.wait_cold())
            time.sleep(1.0)
            t_cli = time.time()
            procs: dict = {}
            dt, wall, out = bench.run(on_marker=lambda seen=procs: seen.update(bench.processes_now()))  # runner up
            a_times.append(dt)
            parts.append(bench.breakdown(t_cli, wall, procs))
            waited.append(bench.wait_cold())
            time.sleep(1.0)
            dt, b_part = bench.sbatch_echo()
            b_times.append(dt)
            b_parts.append(b_part)
            print(f"pair {i + 1}: dstack run {ms(a_times[-1])}, sbatch echo {ms(b_times[-1])} "
                  f"(waited {waited[-2]:.1f} s for no runner)", flush=True)
        node_parts = bench.node_parts()
    finally:
        if bench is not None:
            bench.close()
    after = machine_activity()

    a, b = statistics.median(a_times), statistics.median(b_times)
    ratio = a / b
    rows = [{"case": "A: dstack run (slurm backend, cold, venv there)", "median": ms(a),
             "p25-p75": f"{ms(stats(a_times)['p25'])}-{ms(stats(a_times)['p75'])}"},
            {"case": "B: sbatch --wrap 'echo hi' until the file has it", "median": ms(b),
             "p25-p75": f"{ms(stats(b_times)['p25'])}-{ms(stats(b_times)['p75'])}"}]
    print()
    print_table(rows, ["case", "median", "p25-p75"])
    pair_ratio = statistics.median(x / y for x, y in zip(a_times, b_times, strict=True))
    print(f"\nA / B = {ratio:.2f}x (target < {TARGET:g}x: {verdict(ratio, TARGET)}); A - B = {ms(a - b)}; "
          f"per-pair ratios: median {pair_ratio:.2f}x")
    print("\nwhere A's time goes (medians over the pairs, ms):")
    breakdown = {}
    for label, start, end in STAGES:
        xs = [p["points"][end] - p["points"][start] for p in parts
              if p["points"].get(start) is not None and p["points"].get(end) is not None]
        breakdown[label] = statistics.median(xs) if xs else None
        print(f"  {label:38} {ms(breakdown[label]) if xs else 'n/a':>8}  ({len(xs)} of {len(parts)})")
    print("\nwhere B's time goes (medians over the pairs, ms):")
    b_breakdown = {}
    for label, start, end in B_STAGES:
        xs = [p["points"][end] - p["points"][start] for p in b_parts
              if p["points"].get(start) is not None and p["points"].get(end) is not None]
        b_breakdown[label] = statistics.median(xs) if xs else None
        print(f"  {label:38} {ms(b_breakdown[label]) if xs else 'n/a':>8}  ({len(xs)} of {len(b_parts)})")
    print("\non this machine (the node), alone (medians of 5; Slurm's launch: of 3):")
    for k, v in node_parts.items():
        print(f"  {k:60} {ms(v) if v is not None else 'n/a'}")
    print(f"\nafter: {after['uptime']}\n  busiest: {'; '.join(after['top_cpu'])}")
    write_results("slurm_cold", {
        "pairs": args.pairs, "snapshot_sha256": snapshot_hash(Path(os.environ[SNAPSHOT_ENV])),
        "machine_before": before, "machine_after": after,
        "cases": {"dstack_run_cold": stats(a_times), "sbatch_echo": stats(b_times)},
        "ratio": ratio, "pair_ratio_median": pair_ratio, "target_ratio_lt": TARGET, "pass": ratio < TARGET,
        "breakdown_median_s": breakdown, "breakdown_samples": parts, "node_parts_s": node_parts,
        "b_breakdown_median_s": b_breakdown, "b_breakdown_samples": b_parts,
        "waited_for_no_runner_s": waited})


if __name__ == "__main__":
    main()
