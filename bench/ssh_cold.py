"""SSH cold start (issue 16): from `dstack run` to the job's first output when no runner is up, through the `ssh`
backend, with the host's virtual environment already installed (dir/venv, kept between runners), against
`ssh host echo hi` to the same host. Target: under 1 s more than the baseline (median against median).

The host is real, as in tests/e2e/test_ssh_backend.py: a network namespace on a bridge (tests/netns.py) running
Debian's sshd (tests/sshd.py: its own host key and client key pair, root logs in with the key), a `dstack server`
bound to the bridge's address (tests/dstack_server.py: no local runners), the backend added with the CLI
(`dstack backends add ssh --set hosts=root@ADDR --set dir=/tmp/dstack-bench-ssh-host-<hex> --secret-file
private_key=KEY`) and `dstack limits set ssh --idle-timeout 2`. One warm-up run installs the venv on the host
(not measured). Before each measured `dstack run`, the script waits until no `runner.sh` of that dir is left on
the host and `dstack backends --json` counts 0 instances, then pauses 1 s: each measured run starts a runner.

Pairs, A then B, 1 s of pause before each:
  A  `dstack run first` (a git project; `commands: [echo first-output, ...]`): from spawning the CLI to the line
     `first-output` in its stdout+stderr (read as it streams)
  B  `ssh -i KEY -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null ... root@ADDR echo hi`: from
     spawning it to the line `hi` (a new SSH connection each time; the server's own connection to the host is
     kept open between its commands, so A pays no handshake of its own)

Where A's time goes, per run, on one clock (the host is this machine's network namespace): the job's
`submitted_at`; the server log's `ssh: runner NAME started on` (the backend's create() returned: the decision
and one SSH command); the start of the host's `runner.sh` and of its `dstack-runner` process (/proc start times,
10 ms ticks, read while the runner is up); the runner log's `registered as NAME` (dir/runner.log); the job's
`started_at` (taken); the first output at the CLI. Also, on the host, what its parts cost alone (medians of 5).

The code measured is a copy of src/dstack taken as the script starts (cold_start.run_on_a_snapshot): the
server's wheelhouse key follows dstack's files, and another session's edit in the middle would make a measured
run reinstall the venv. Must run as root (network namespaces). Everything started is stopped at the end, also
on Ctrl-C, SIGTERM or failure: the server, sshd and every process in the host's namespace, the host's dir, the
namespace and the bridge.

    .venv/bin/python bench/ssh_cold.py [--pairs 7]
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
IDLE = 2  # seconds a runner waits for a job before it exits
TARGET_S = 1.0  # median(A) - median(B) under this


class Bench:
    def __init__(self) -> None:
        self.tmp = fresh_home("ssh")
        self.host_dir = f"/tmp/dstack-bench-ssh-host-{secrets.token_hex(4)}"
        self.hosts = self.servers = self.server = None

    def start(self) -> None:
        """The host, its sshd, the server and the backend (close() stops whatever of them was started)."""
        from tests.dstack_server import Server
        from tests.netns import Hosts
        from tests.sshd import Servers

        self.hosts = Hosts()
        self.servers = Servers(self.hosts)
        self.sshd = self.servers.start("h1")
        self.server = Server(self.tmp / "home", host=self.hosts.address)
        self.server_log = Path(self.server.log.name)
        self.env = {**env_for(self.tmp / "client"), "DSTACK_SERVER_URL": self.server.url,
                    "DSTACK_TOKEN": self.server.token}
        self.project = make_project(self.tmp / "proj", WORKFLOWS)
        self.target = f"root@{self.sshd.host}"
        self.cli("backends", "add", "ssh", "--set", f"hosts={self.target}", "--set", f"dir={self.host_dir}",
                 "--secret-file", f"private_key={self.sshd.private_key}")
        self.cli("limits", "set", "ssh", "--idle-timeout", str(IDLE))
        self.baseline = ["ssh", "-F", "/dev/null", "-i", str(self.sshd.private_key), "-o", "StrictHostKeyChecking=no",
                         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                         "-o", "LogLevel=ERROR", self.target, "echo hi"]

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

    def ssh_echo(self) -> tuple[float, float, str]:
        return first_line(self.baseline, "hi")

    def runner_scripts(self) -> list[int]:
        return pids_with(f"{self.host_dir}/runner.sh")

    def instances(self) -> int:
        found = json.loads(self.cli("backends", "--json"))
        return next(b["instances"] for b in found if b["name"] == "ssh")

    def wait_cold(self, timeout: float = 90) -> float:
        """Until no runner.sh of the host's dir is left and the server counts 0 instances: seconds waited."""
        t0 = time.monotonic()
        while self.runner_scripts() or self.instances() != 0:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"a runner is still up after {timeout} s: {self.runner_scripts()} "
                                   f"{self.cli('backends')}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def processes_now(self) -> dict:
        """Start times of the host's runner.sh and dstack-runner (read while the runner is up)."""
        out = {}
        for key, text in (("runner_sh", f"{self.host_dir}/runner.sh"),
                          ("dstack_runner", f"{self.host_dir}/venv/bin/dstack-runner")):
            starts = [t for t in map(proc_started, pids_with(text)) if t is not None]
            out[key] = min(starts) if starts else None
        return out

    def breakdown(self, t_cli: float, wall: float, procs: dict) -> dict:
        http = self.server.admin
        repo_id = json.loads(self.cli("status", "--all", "--json"))[0]["repo_id"]
        job = http.get("/api/runs", params={"repo_id": repo_id, "limit": 1}).json()[0]["jobs"][0]
        name = job["runner"]
        created = re.findall(rf"^(\S+ \S+) INFO dstack\.server: ssh: runner {re.escape(name)} started on",
                             self.server_log.read_text(errors="replace"), re.M)
        runner_log = Path(f"{self.host_dir}/runner.log").read_text(errors="replace")
        registered = re.findall(rf"^(\S+ \S+) INFO registered as {re.escape(name)} ", runner_log, re.M)
        taken = job.get("started_at")
        points = [("cli_spawned", t_cli), ("submitted", ts(job["submitted_at"])),
                  ("create_returned", log_ts(created[-1]) if created else None),
                  ("runner_sh_started", procs.get("runner_sh")), ("dstack_runner_started", procs.get("dstack_runner")),
                  ("registered", log_ts(registered[-1]) if registered else None),
                  ("job_taken", ts(taken) if taken else None), ("first_output", wall)]
        return {"runner": name, "points": dict(points)}

    def host_parts(self) -> dict:
        """What the bootstrap's and runner's pieces cost alone on the host (medians of 5, over one ssh call)."""
        from dstack.backends.bootstrap import _INSTALL

        d = self.host_dir
        # the bootstrap's step 3 alone (GET /api/wheels, the venv found installed), with the admin's token
        Path(f"{d}/bench-install.py").write_text(_INSTALL)
        token = Path(f"{d}/bench.token")
        token.touch(mode=0o600)
        token.write_text(self.server.token + "\n")
        install = ["python3", f"{d}/bench-install.py", self.server.url, str(token), f"{d}/venv", f"{d}/bench.log"]
        probe = f"""
import json, statistics, subprocess, time
IMPORTS = ("import httpx, dstack.runner.main, dstack.runner.client, dstack.runner.daemon; "
           "from dstack.runner.resources import detect_resources")
cases = {{
  "sh -c true": ["sh", "-c", "true"],
  "python3 -c version check": ["python3", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
  "python3 with the installer's imports": ["python3", "-c", "import fcntl, glob, hashlib, json, os, platform, re, \
shutil, subprocess, sys, tempfile, time, urllib.error, urllib.request"],
  "bootstrap step 3 (python3 installer: GET /api/wheels, venv check)": {json.dumps(install)},
  "venv python -c pass": ["{d}/venv/bin/python", "-c", "pass"],
  "venv: import dstack.runner.main": ["{d}/venv/bin/python", "-c", "import dstack.runner.main"],
  "dstack-runner --help": ["{d}/venv/bin/dstack-runner", "--help"],
  "venv: the runner's imports": ["{d}/venv/bin/python", "-c", IMPORTS],
  "venv: the imports + detect_resources()": ["{d}/venv/bin/python", "-c", IMPORTS + "; detect_resources()"],
}}
out = {{}}
for name, argv in cases.items():
    xs = []
    for _ in range(5):
        t0 = time.perf_counter()
        rc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        xs.append(time.perf_counter() - t0)
    out[name if rc == 0 else name + " (exit %d)" % rc] = statistics.median(xs)
print(json.dumps(out))
"""
        p = subprocess.run([*self.sshd.ssh_argv(), "python3 -"], input=probe, capture_output=True, text=True,
                           timeout=120)
        if p.returncode != 0:
            return {"error": p.stderr[-500:]}
        return json.loads(p.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.servers is not None:
            self.servers.close()  # sshd, and every process left in the host's namespace (the runner's too)
        for pid in pids_with(self.host_dir):  # anything of the host's dir left outside it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.host_dir, ignore_errors=True)
        if self.hosts is not None:
            self.hosts.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


STAGES = [("CLI start to run submitted", "cli_spawned", "submitted"),
          ("decide + SSH command, to runner.sh", "submitted", "runner_sh_started"),
          ("bootstrap (version + venv check)", "runner_sh_started", "dstack_runner_started"),
          ("runner start + register", "dstack_runner_started", "registered"),
          ("register to job taken", "registered", "job_taken"), ("taken to first output", "job_taken", "first_output"),
          ("(info: submitted to create() returned)", "submitted", "create_returned")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=7)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ssh_cold.py makes network namespaces: run it as root")
    run_on_a_snapshot(__file__)
    sys.path.insert(0, str(REPO))  # tests.netns, tests.sshd, tests.dstack_server
    from tests.netns import why_not as netns_why_not
    from tests.sshd import why_not as sshd_why_not

    for reason in (netns_why_not(), sshd_why_not()):
        if reason:
            sys.exit(reason)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    before = machine_activity()
    print(f"before: {before['uptime']}\n  busiest: {'; '.join(before['top_cpu'])}", flush=True)
    bench = None
    a_times: list[float] = []
    b_times: list[float] = []
    parts: list[dict] = []
    waited: list[float] = []
    try:
        bench = Bench()
        bench.start()
        t0 = time.monotonic()
        dt, _, out = bench.run()  # warm-up: the server's first run, the wheelhouse, the venv on the host
        print(f"warm-up run (installs {bench.host_dir}/venv): first output after {dt:.1f} s, "
              f"{time.monotonic() - t0:.1f} s in all", flush=True)
        installed = re.findall(r"installed dstack \S+ into \S+ in [\d.]+s",
                               Path(f"{bench.host_dir}/runner.log").read_text(errors="replace"))
        if installed:
            print(f"  runner.log: {installed[-1]}")
        bench.ssh_echo()
        for i in range(args.pairs):
            waited.append(bench.wait_cold())
            time.sleep(1.0)
            t_cli = time.time()
            procs: dict = {}
            dt, wall, out = bench.run(on_marker=lambda seen=procs: seen.update(bench.processes_now()))  # runner up
            a_times.append(dt)
            parts.append(bench.breakdown(t_cli, wall, procs))
            time.sleep(1.0)
            b_times.append(bench.ssh_echo()[0])
            print(f"pair {i + 1}: dstack run {ms(a_times[-1])}, ssh echo {ms(b_times[-1])} "
                  f"(waited {waited[-1]:.1f} s for no runner)", flush=True)
        bench.wait_cold()
        host_parts = bench.host_parts()
    finally:
        if bench is not None:
            bench.close()
    after = machine_activity()

    a, b = statistics.median(a_times), statistics.median(b_times)
    diff = a - b
    rows = [{"case": "A: dstack run (ssh backend, cold)", "median": ms(a),
             "p25-p75": f"{ms(stats(a_times)['p25'])}-{ms(stats(a_times)['p75'])}"},
            {"case": "B: ssh host echo hi", "median": ms(b),
             "p25-p75": f"{ms(stats(b_times)['p25'])}-{ms(stats(b_times)['p75'])}"}]
    print()
    print_table(rows, ["case", "median", "p25-p75"])
    pair_diff = statistics.median(x - y for x, y in zip(a_times, b_times, strict=True))
    print(f"\nA - B = {ms(diff)} (target < {TARGET_S:g} s: {verdict(diff, TARGET_S)}); A / B = {a / b:.2f}x; "
          f"per-pair differences: median {ms(pair_diff)}")
    print("\nwhere A's time goes (medians over the pairs, ms):")
    breakdown = {}
    for label, start, end in STAGES:
        xs = [p["points"][end] - p["points"][start] for p in parts
              if p["points"].get(start) is not None and p["points"].get(end) is not None]
        breakdown[label] = statistics.median(xs) if xs else None
        print(f"  {label:34} {ms(breakdown[label]) if xs else 'n/a':>8}  ({len(xs)} of {len(parts)})")
    print("\non the host, alone (medians of 5):")
    for k, v in host_parts.items():
        print(f"  {k:66} {ms(v) if isinstance(v, float) else v}")
    print(f"\nafter: {after['uptime']}\n  busiest: {'; '.join(after['top_cpu'])}")
    write_results("ssh_cold", {
        "pairs": args.pairs, "idle_timeout_s": IDLE, "snapshot_sha256": snapshot_hash(Path(os.environ[SNAPSHOT_ENV])),
        "machine_before": before, "machine_after": after,
        "cases": {"dstack_run_cold": stats(a_times), "ssh_echo": stats(b_times)},
        "difference_s": diff, "ratio": a / b, "target_difference_lt_s": TARGET_S, "pass": diff < TARGET_S,
        "breakdown_median_s": breakdown, "breakdown_samples": parts, "host_parts_s": host_parts,
        "waited_for_no_runner_s": waited})


if __name__ == "__main__":
    main()
