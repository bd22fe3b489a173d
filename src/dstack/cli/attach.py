"""Following a run: its logs as they come, Ctrl-C to stop or detach, its exit code at the end."""

from __future__ import annotations

import sys

from dstack.api.client import Client
from dstack.core.models import Job, JobStatus, Run


def exit_code_of(job: Job) -> int:
    if job.status == JobStatus.DONE:
        return 0
    if job.status in (JobStatus.STOPPED, JobStatus.ABORTED):
        return 130  # interrupted by the user, as with Ctrl-C in a shell
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


def follow_run(client: Client, run: Run, interrupt_asks: bool = True) -> int:
    """Stream the logs of `run`'s jobs until all have ended; return the exit code to exit with.
    Ctrl-C asks whether to stop the run (`interrupt_asks`), else just stops following it."""
    out = sys.stdout.buffer
    offsets = {j.job_id: 0 for j in run.jobs}
    finished: set[str] = set()
    stopping: str | None = None
    announced: set[str] = set()
    with_ports = {j.job_id: j.spec.ports if j.spec else 0 for j in run.jobs}
    while len(finished) < len(offsets):
        try:
            for job_id in offsets:
                if job_id in finished:
                    continue
                data, offsets[job_id], status = client.logs(job_id, offsets[job_id], wait=1.0)
                if data:
                    out.write(data)
                    out.flush()
                if status == JobStatus.RUNNING and job_id not in announced:
                    announced.add(job_id)
                    if with_ports.get(job_id):
                        _announce_ports(client.job(job_id))
                if status.finished:
                    finished.add(job_id)
        except KeyboardInterrupt:
            if not interrupt_asks:
                sys.stderr.write(f"\nStopped following {run.run_name}; it goes on (`dstack stop {run.run_name}` "
                                 "stops it).\n")
                return 130
            if stopping:  # a second Ctrl-C while stopping: abort
                if stopping == "stop":
                    stopping = "abort"
                    sys.stderr.write("\nAborting...\n")
                    client.stop(None, run.run_name, abort=True)
                continue
            choice = _ask(run.run_name)
            if choice == "detach":
                sys.stderr.write(f"Detached. `dstack logs {run.run_name} -f` follows it again; "
                                 f"`dstack stop {run.run_name}` stops it.\n")
                return 0
            if choice in ("stop", "abort"):
                stopping = choice
                sys.stderr.write("Stopping (Ctrl-C again to abort)...\n" if choice == "stop" else "Aborting...\n")
                client.stop(None, run.run_name, abort=choice == "abort")
    final = client.run(None, run.run_name)
    jobs = [j for j in final.jobs if j.job_id in offsets]
    _summary(final.run_name, jobs)
    if final.tags:
        sys.stderr.write(f"Tagged {', '.join(f'{final.workflow}:{t}' for t in final.tags)}\n")
    elif final.tag_when_done and final.status != JobStatus.DONE:
        sys.stderr.write(f"Not tagged {final.workflow}:{final.tag_when_done}: the run is {final.status.value}\n")
    return next((c for c in (exit_code_of(j) for j in jobs) if c), 0)


def _announce_ports(job: Job) -> None:
    """Where the job's ports (PORT_0, ...) can be reached; apps must bind 0.0.0.0 or the runner's host."""
    host = job.hostname or "127.0.0.1"
    for i, port in enumerate(job.ports):
        sys.stderr.write(f"PORT_{i}: http://{host}:{port}\n")


def _summary(run_name: str, jobs: list[Job]) -> None:
    err = sys.stderr
    color = err.isatty()
    for job in jobs:
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
        err.write(f"{mark}{run_name} {job.status.value}{off}{took}{detail}\n")
