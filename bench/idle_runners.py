"""The server's CPU with idle runners connected (issue 14): an idle runner should cost the server next to nothing.

A server in the foreground (no local runners) in a fresh DSTACK_HOME; first its CPU over --seconds with no
runner (the baseline), then with --runners real `dstack-runner start --no-docker` processes registered, each
with a token of its own, heartbeating and long-polling for a job, over the same span. CPU is the server
process's user + system time from /proc (clock ticks), as a share of one core.

    .venv/bin/python bench/idle_runners.py [--runners 200] [--seconds 30]
Target: < 10% of one core with 200 runners.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, DSTACK, env_for, fresh_home, print_table, verdict, write_results  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def share(pid: int, seconds: float) -> float:
    start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - start) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runners", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30)
    args = ap.parse_args()
    import httpx

    home = fresh_home("idle")
    env = {**env_for(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    server = subprocess.Popen([DSTACK, "server", "--port", "0"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    runners: list[subprocess.Popen] = []
    try:
        info = home / "server" / "server.json"
        while not info.exists():
            time.sleep(0.1)
        url = json.loads(info.read_text())["url"]
        admin = httpx.Client(base_url=url, timeout=60,
                             headers={"Authorization": f"Bearer {(home / 'server' / 'token').read_text().strip()}"})
        time.sleep(3)  # the server's start-up done
        idle = share(server.pid, args.seconds)
        for i in range(args.runners):
            token = admin.post("/api/runners/tokens", json={"name": f"idle-{i}"}).json()["token"]
            runners.append(subprocess.Popen(
                [str(BIN / "dstack-runner"), "start", "--server", url, "--no-docker",
                 "--workdir", str(home / "runners" / f"idle-{i}")],
                env={**env, "DSTACK_TOKEN": token}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 600
        while len(admin.get("/api/runners").json()) < args.runners:
            assert time.monotonic() < deadline, "the runners did not all register"
            time.sleep(1)
        time.sleep(10)  # their start-up (registration, first polls) over
        busy = share(server.pid, args.seconds)
    finally:
        for r in runners:
            r.send_signal(signal.SIGTERM)
        for r in runners:
            try:
                r.wait(timeout=30)
            except subprocess.TimeoutExpired:
                r.kill()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    rows = [{"case": "no runner", "server CPU": f"{idle * 100:.1f}% of a core"},
            {"case": f"{args.runners} idle runners", "server CPU": f"{busy * 100:.1f}% of a core",
             "per runner": f"{busy / args.runners * 1000:.2f} ms/s", "target": "< 10%",
             "verdict": verdict(busy, 0.10)}]
    print_table(rows, ["case", "server CPU", "per runner", "target", "verdict"])
    write_results("idle_runners", {"runners": args.runners, "seconds": args.seconds, "idle_share": idle,
                                   "busy_share": busy})


if __name__ == "__main__":
    main()
