"""What every executor offers the runner: start a job, stream its output, wait for it, stop it.

An executor turns a `JobSpec` plus a folder holding the job's code into a running process
(on the host, or in a container). Output is a terminal stream: both executors give the job a
pseudo-terminal, so programs line-buffer and progress bars (`\\r`) arrive as written; like any
terminal, `\\n` arrives as `\\r\\n`.
"""

from __future__ import annotations

import posixpath
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dstack.core.models import JobSpec

OutputCallback = Callable[[bytes], None]


class ExecutorError(Exception):
    """A job could not be started: its image is missing, Docker is unreachable, its folder is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Mount:
    """A host folder made visible to the job at `target`: relative to the job's root folder (e.g. `data` for a
    dependency's artifact), absolute (an absolute artifact), or `~/...` (a `cache:` folder in the job's home)."""

    source: Path
    target: str
    read_only: bool = True


class Execution(Protocol):
    """A started job."""

    image_digest: str | None
    ports: list[int]
    # why the job ended, when something else than the job itself ended it (set by wait(); e.g. "the Docker
    # daemon stopped while the job ran (exit code 143)"); None otherwise
    failure_reason: str | None

    def wait(self) -> int:
        """Block until the job ends and its output is drained; its exit code (128+N when killed by
        signal N)."""
        ...

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns once the job is dead.
        Safe to call twice, and after the job has ended."""
        ...

    def dispose(self) -> None:
        """Free what the ended job holds on the machine (e.g. its container), without waiting. The runner
        calls it once the job's final status is reported, so that the clean-up does not delay the report."""
        ...


class Executor(Protocol):
    # whether it mounts folders anywhere (absolute and `~/` targets): a container, a root runner's namespace
    binds_anywhere: bool

    def start(
        self,
        job: JobSpec,
        root: Path,
        mounts: list[Mount],
        env: dict[str, str],
        on_output: OutputCallback,
    ) -> Execution:
        """Start `job` with its code in `root` and working folder `root / job.working_dir`.
        `on_output` is called from a background thread with raw chunks of the job's output."""
        ...

    def warm(self, job: JobSpec, root: Path) -> bool:
        """Get ready for the next job like `job`, to run with its code in `root` (made here). False when
        there is nothing to get ready."""
        ...

    def claim(self, job: JobSpec) -> Path | None:
        """The root that `warm` made ready for a job like `job` (its code goes there, then `start`), or None."""
        ...

    def release(self, job: JobSpec) -> None:
        """What `claim` kept for `job` and `start` did not use is let go."""
        ...

    def close(self) -> None:
        """Let go of everything kept ready; get nothing ready any more."""
        ...


def job_script(commands: list[str]) -> str:
    """The job's commands as one shell script that stops at the first failing command."""
    return "set -e\n" + "\n".join(commands)


def relative_working_dir(working_dir: str) -> str:
    """`job.working_dir` normalised to a path inside the job's root ('.' for the root itself)."""
    path = posixpath.normpath(working_dir.strip() or ".").lstrip("/") or "."
    if path == ".." or path.startswith("../"):
        raise ExecutorError(f"working_dir '{working_dir}' points outside the repository")
    return path


def pick_free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that nothing listens on right now, on any local address, from below the kernel's
    ephemeral range (there, an outgoing connection of any process could take one before the job listens on it).

    The sockets are held open until all ports are picked, so that the ports differ. Another
    process may take one before the job binds it; that window is short and unavoidable."""
    sockets: list[socket.socket] = []
    low = _ephemeral_low()
    try:
        for _ in range(200):
            if len(sockets) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("", random.randrange(FIRST_JOB_PORT, low)) if low > FIRST_JOB_PORT + 1000 else ("", 0))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        while len(sockets) < n:  # a crowded machine: what the kernel gives
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


FIRST_JOB_PORT = 10000  # jobs' ports: from here to the ephemeral range's start


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def job_env(job: JobSpec, ports: list[int], env: dict[str, str]) -> dict[str, str]:
    """The variables a job sees, later ones winning: the runner's (ids, ports), the workflow's
    `env`, then the caller's `env` (e.g. secrets)."""
    result = {
        "PYTHONUNBUFFERED": "1",
        "JOB_ID": job.job_id,
        "RUN_NAME": job.run_name,
    }
    for i, port in enumerate(ports):
        result[f"PORT_{i}"] = str(port)
        result[f"JOB_PORT_{i}"] = str(port)
    result.update(job.env)
    result.update(env)
    return result
