"""Following a run: its logs as they come, Ctrl-C to stop or detach, its exit code at the end."""

from __future__ import annotations

import sys

from dstack.api.client import Client
from dstack.core.models import Job, JobStatus, Run


def exit_code_of(job: Job) -> int:
    if job.status == JobStatus.DONE:
        return 0
    if job.status in (JobStatus.STOPPED, JobStatus.ABORTED):
        return 130 if job.exit_code in (None, 0) else job.exit_code
    return job.exit_code if job.exit_code not in (None, 0) else 1


def _ask(run_name: str) -> str:
    """stop | abort | detach | continue. A second Ctrl-C while asking stops."""
    if not sys.stdin.isatty():
        return "stop"
    sys.stderr.write(f"\nStop {run_name}? [S]top (save artifacts) / [a]bort / [d]etach / [c]ontinue: ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline().strip().lower()
    except KeyboardInterrupt:
        return "stop"
    return {"": "stop", "s": "stop", "a": "abort", "d": "detach", "c": "continue"}.get(answer[:1], "stop")


def follow_run(client: Client, run: Run) -> int:
    out = sys.stdout.buffer
    err = sys.stderr
    offsets = {j.job_id: 0 for j in run.jobs}
    finished: dict[str, JobStatus] = {}
    stopping = None
    while len(finished) < len(offsets):
        for job_id in offsets:
            if job_id in finished:
                continue
            try:
                data, offsets[job_id], status = client.logs(job_id, offsets[job_id], wait=1.0)
            except KeyboardInterrupt:
                if stopping == "stop":
                    stopping = "abort"
                    err.write("\nAborting...\n")
                    client.stop(None, run.run_name, abort=True)
                    continue
                choice = _ask(run.run_name)
                if choice == "detach":
                    err.write(f"Detached. `dstack logs {run.run_name} -f` follows it again; "
                              f"`dstack stop {run.run_name}` stops it.\n")
                    return 0
                if choice in ("stop", "abort"):
                    stopping = choice
                    err.write("Stopping...\n" if choice == "stop" else "Aborting...\n")
                    client.stop(None, run.run_name, abort=choice == "abort")
                continue
            if data:
                out.write(data)
                out.flush()
            if status.finished:
                finished[job_id] = status
    final = client.run(None, run.run_name)
    code = 0
    for job in final.jobs:
        code = code or exit_code_of(job)
    _summary(final)
    return code


def _summary(run: Run) -> None:
    err = sys.stderr
    color = err.isatty()
    for job in run.jobs:
        took = ""
        if job.started_at and job.finished_at:
            took = f" in {(job.finished_at - job.started_at).total_seconds():.1f}s"
        detail = ""
        if job.status != JobStatus.DONE:
            detail = f": {job.reason}" if job.reason else ""
            if job.exit_code not in (None, 0) and "code" not in (job.reason or ""):
                detail += f" (exit code {job.exit_code})"
        mark = {"DONE": "\033[32m", "FAILED": "\033[31m"}.get(job.status.value, "\033[33m") if color else ""
        off = "\033[0m" if color else ""
        err.write(f"{mark}{run.run_name} {job.status.value}{off}{took}{detail}\n")
