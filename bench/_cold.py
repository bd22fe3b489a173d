"""What the cold-start benchmarks share (cold_start.py, ssh_cold.py, slurm_cold.py): measuring a copy of the code,
timing a command to a line of its output, and reading when things happened from logs and /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import REPO, fresh_home

SNAPSHOT_ENV = "DSTACK_BENCH_SNAPSHOT"


def ts(text: str) -> float:
    d = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()



def run_on_a_snapshot(script: str) -> None:
    """Run `script` (the benchmark's own file) again with a copy of src/dstack first on PYTHONPATH (for it, the
    servers, the CLI, the runners and the wheels they install), unless this is that run: other sessions editing
    the working tree meanwhile change neither the code measured nor the wheelhouse's key."""
    if os.environ.get(SNAPSHOT_ENV):
        return
    folder = fresh_home("snapshot")
    shutil.copytree(REPO / "src" / "dstack", folder / "dstack", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, SNAPSHOT_ENV: str(folder),
           "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
    child = subprocess.Popen([sys.executable, script, *sys.argv[1:]], env=env)
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C: the child has it too; it stops what it started, let it finish
                pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)


def first_line(cmd: list[str], marker: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300, on_marker=None) -> tuple[float, float, str]:
    """Seconds from spawning `cmd` to the line `marker` in its stdout+stderr, the wall clock then, and its whole
    output (it is left to finish: its exit status is checked). `on_marker()` is called as soon as it is seen."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if line.strip() == marker.encode():
                dt, wall = time.perf_counter() - t0, time.time()
                if on_marker is not None:
                    on_marker()
                break
        else:
            p.wait(timeout=timeout)
            raise RuntimeError(f"{cmd} exited {p.returncode} without the line {marker!r}:\n"
                               f"{b''.join(seen)[-3000:].decode(errors='replace')}")
        seen.append(p.stdout.read())
        if p.wait(timeout=timeout) != 0:
            raise RuntimeError(f"{cmd} exited {p.returncode}:\n{b''.join(seen)[-3000:].decode(errors='replace')}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return dt, wall, b"".join(seen).decode(errors="replace")


def log_ts(text: str) -> float:
    """A `logging` asctime (local time, `2026-12-05 01:44:26,123`) as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def proc_started(pid: int) -> float | None:
    """When process `pid` started, epoch seconds (its /proc start time: clock ticks of CLOCK_BOOTTIME)."""
    from dstack.core.processes import start_time

    ticks = start_time(pid)
    if ticks is None:
        return None
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")


def pids_with(*texts: str) -> list[int]:
    """Processes of this machine whose command line holds every one of `texts` (a test host's, a Slurm node's are
    this machine's too)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                cmdline = (entry / "cmdline").read_bytes()
                if all(t.encode() in cmdline for t in texts):
                    out.append(int(entry.name))
        except OSError:
            pass
    return out


def machine_activity() -> dict:
    """What else the machine was doing: the load average, and the busiest processes (top's %CPU over 1 s)."""
    top = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200", "-o", "%CPU"], capture_output=True,
                         text=True, timeout=30).stdout.splitlines()  # the second frame: %CPU over that 1 s
    head = max((i for i, line in enumerate(top) if line.lstrip().startswith("PID")), default=None)
    busy = [" ".join(line.split()[8:9] + line.split()[11:12]) for line in top[head + 1: head + 7]] if head else []
    return {"loadavg": os.getloadavg(), "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout
            .strip(), "top_cpu": busy}


def snapshot_hash(folder: Path) -> str:
    """Which code was measured: a hash of the snapshot's files (names and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"{path.relative_to(folder)}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
