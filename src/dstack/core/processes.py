"""Which process is which: a pid alone may be reused by another program once its process has died, so a
process of ours is recorded as its pid *and* its start time, and only that pair is ever signalled."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def stop_grace() -> float:
    """Seconds between SIGTERM and SIGKILL when a job is stopped (DSTACK_STOP_GRACE, 10)."""
    return float(os.environ.get("DSTACK_STOP_GRACE", "10"))


def runner_stop_wait() -> float:
    """How long a runner told to stop is given before SIGKILL: its job's stop grace, and 10 s more to report
    and to remove the job's container."""
    return stop_grace() + 10


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, field 22 of /proc/PID/stat); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone, or not ours to read
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        if fields[0] == b"Z":  # a zombie has exited already
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_running(pid: int | None, started: int | None) -> bool:
    """Whether the process recorded as (pid, started) is still that process and still runs."""
    if not pid or pid <= 0 or started is None:
        return False
    return start_time(pid) == started


def record(path: Path, pid: int, **extra) -> None:
    """Write `path` (mode 0600) saying which process `pid` is, with `extra` fields."""
    from dstack.core.home import write_private

    write_private(path, json.dumps({"pid": pid, "started": start_time(pid), **extra}))


def read_record(path: Path, legacy: str | None = None) -> dict | None:
    """A record written by `record`, if it is there and its process still runs. `legacy`: a record of an older
    dstack has no start time; it counts when that process's command line holds `legacy` (e.g. the server's
    own `--home PATH `: this home's server, no other) and it is given the start time, so that it can be
    signalled as any other; `legacy` is then True in it."""
    try:
        info = json.loads(path.read_text())
        pid, started = int(info["pid"]), info.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if started is None and legacy is not None and legacy.encode() in _cmdline(pid) + b" ":
        info.update(started=start_time(pid), legacy=True)
        started = info["started"]
    return info if is_running(pid, started) else None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ")
    except OSError:
        return b""


def terminate(pid: int, started: int | None, grace: float = 10.0) -> bool:
    """SIGTERM the recorded process, then SIGKILL after `grace` s; True when it was running. A pid that now
    belongs to another process is never signalled."""
    return bool(terminate_all([(pid, started)], grace))


def terminate_all(processes: list[tuple[int, int | None]], grace: float = 10.0) -> int:
    """SIGTERM each recorded process (pid, start time) that still runs, all at once, then SIGKILL those still
    running after `grace` s; how many ran."""
    running = [(pid, started) for pid, started in processes if is_running(pid, started)]
    for pid, _ in running:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(*p) for p in running):
        time.sleep(0.05)
    left = [p for p in running if is_running(*p)]
    for pid, _ in left:
        _signal(pid, signal.SIGKILL)
    for _ in range(100):
        if not any(is_running(*p) for p in left):
            break
        time.sleep(0.02)
    return len(running)


def signal_recorded(pid: int, started: int | None, sig: int) -> None:
    """Send `sig` to the recorded process, if it is still that process."""
    if is_running(pid, started):
        _signal(pid, sig)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
