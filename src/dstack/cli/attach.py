"""Following a run: its logs as they come, Ctrl-C to stop or detach, its exit code at the end.

Works on the API's JSON (runs and jobs as dicts), so that `dstack run` loads no models."""

from __future__ import annotations

import sys
import time

from dstack.api.client import Client, Unreachable
from dstack.core.names import DEFAULT_JOB_USER as JOB_USER
from dstack.core.names import printable
from dstack.core.status import JobStatus

WAIT_NOTICE = 3.0  # seconds a job may wait for a runner before the attached run says that it waits


def exit_code_of(job: dict) -> int:
    if job["status"] == JobStatus.DONE:
        return 0
    if job["status"] in (JobStatus.STOPPED, JobStatus.ABORTED):
        return 130  # interrupted by the user, as with Ctrl-C in a shell
    return job["exit_code"] if job.get("exit_code") not in (None, 0) else 1


def _ask(run_name: str) -> str:
    """stop | abort | detach | continue. A second Ctrl-C while asking stops."""
    if not sys.stdin.isatty():
        return "stop"
    sys.stderr.write(f"\nStop {run_name}? [S]top (save artifacts) / [a]bort / [d]etach / [c]ontinue: ")
    sys.stderr.flush()
    try:
        line = sys.stdin.readline()
    except KeyboardInterrupt:
        line = ""
    if not line.endswith("\n"):  # Ctrl-C (the terminal echoed ^C) or Ctrl-D: what follows starts a line of its own
        sys.stderr.write("\n")
    answer = line.strip().lower()
    return {"": "stop", "s": "stop", "a": "abort", "d": "detach", "c": "continue"}.get(answer[:1], "stop")


def follow_run(client: Client, run: dict, interrupt_asks: bool = True, interrupted: bool = False) -> int:
    """Stream the logs of `run`'s jobs until all have ended; return the exit code to exit with.
    Ctrl-C asks whether to stop the run (`interrupt_asks`), else just stops following it. `interrupted`:
    Ctrl-C was pressed already (while the run was submitted)."""
    out = sys.stdout.buffer
    name = run["run_name"]
    offsets = {j["job_id"]: 0 for j in run["jobs"]}
    finished: dict[str, dict] = {}  # job id -> its outcome: status, exit_code, reason, seconds
    stopping: str | None = None
    announced: set[str] = set()
    statuses = {j["job_id"]: j["status"] for j in run["jobs"]}  # as seen last
    with_ports = {j["job_id"]: (j.get("spec") or {}).get("ports", 0) for j in run["jobs"]}
    on_host = {j["job_id"] for j in run["jobs"] if not (j.get("spec") or {}).get("image")}  # announced as root
    said_root: set[str] = set()  # the runners it was said of
    lost = False  # the server cannot be reached (now)
    at_line_start = True  # the job's output so far ends with a newline: a line of ours needs none before it
    following_since, said_waiting, said_why, next_look = time.monotonic(), False, None, 0.0

    def note(text: str) -> None:
        """A line of dstack's own among the job's output, on a line of its own."""
        nonlocal at_line_start
        sys.stderr.write(f"{'' if at_line_start else chr(10)}[dstack: {text}]\n")
        at_line_start = True
    while len(finished) < len(offsets):
        try:
            if interrupted:
                interrupted = False
                raise KeyboardInterrupt
            if lost:
                time.sleep(1)
            for job_id in offsets:
                if job_id in finished:
                    continue
                # a job whose ports are to be announced is followed until it is RUNNING, output or not
                watch = statuses.get(job_id) if with_ports.get(job_id) and job_id not in announced else None
                chunk = client.logs(job_id, offsets[job_id], wait=1.0, status=watch)
                offsets[job_id] = chunk.next_offset
                statuses[job_id] = chunk.status
                if (chunk.status == JobStatus.SUBMITTED and time.monotonic() >= next_look
                        and time.monotonic() - following_since > WAIT_NOTICE):  # never a silent wait
                    next_look = time.monotonic() + WAIT_NOTICE  # the reason may come later, or change
                    why = _why_waiting(client, run, job_id)
                    if why and why != said_why:  # each new one: provisioning, a capacity error, a limit
                        said_why = why
                        note(f"{name} waits for a runner that can run it: {why.removeprefix('waiting: ')}")
                    elif not said_waiting:
                        note(f"{name} waits for a runner that can run it (those that can are busy, or one is "
                             f"starting); `dstack runners` lists them")
                    said_waiting = True
                if job_id in on_host and chunk.runner:
                    on_host.discard(job_id)
                    if chunk.host_user == "root" and chunk.runner not in said_root:
                        said_root.add(chunk.runner)
                        note(f"{name} runs on the host of runner {printable(chunk.runner)} as root: its commands "
                             "can change that machine (give the workflow an `image` to run it in a container)")
                    elif chunk.host_user == JOB_USER and chunk.runner not in said_root:
                        said_root.add(chunk.runner)  # a root runner's jobs: programs under /root are out of reach
                        note(f"{name} runs on the host of runner {printable(chunk.runner)} as a user of its own "
                             f"({JOB_USER}), who cannot read root's files (a Python or conda under /root); give the workflow an "
                             "`image`, or run its jobs as a user who can (`dstack-runner start --job-user USER`; for "
                             "the local runner, DSTACK_JOB_USER=USER as its server starts: `dstack server stop` "
                             "first)")
                if chunk.data:
                    out.write(chunk.data)
                    at_line_start = chunk.data.endswith(b"\n")
                    out.flush()
                if chunk.status == JobStatus.RUNNING and job_id not in announced:
                    announced.add(job_id)
                    if with_ports.get(job_id):
                        _announce_ports(client.job(job_id))
                if chunk.status.finished and not chunk.more:
                    finished[job_id] = {"status": chunk.status, "exit_code": chunk.exit_code,
                                        "reason": chunk.reason, "seconds": chunk.seconds}
            if lost:
                lost = False
                note(f"reconnected to {client.url}")
        except Unreachable as e:  # the job goes on without the server; its output waits on its runner
            if not lost:
                note(f"lost the server ({e.message}); waiting for it to come back (Ctrl-C to stop following)")
            lost = True
        except KeyboardInterrupt:
            if not interrupt_asks:
                sys.stderr.write(f"\nStopped following {name}; it goes on (`dstack stop {name}` "
                                 "stops it).\n")
                return 130
            if stopping:  # a second Ctrl-C while stopping: abort
                if stopping == "stop":
                    stopping = "abort"
                    sys.stderr.write("\nAborting...\n")
                    client.stop(None, name, abort=True)
                continue
            choice = _ask(name)
            if choice == "detach":
                sys.stderr.write(f"Detached. `dstack logs {name} -f` follows it again; "
                                 f"`dstack stop {name}` stops it.\n")
                return 0
            if choice in ("stop", "abort"):
                stopping = choice
                sys.stderr.write("Stopping (Ctrl-C again to abort)...\n" if choice == "stop" else "Aborting...\n")
                client.stop(None, name, abort=choice == "abort")
    jobs = [finished[job_id] for job_id in offsets]
    if not at_line_start:  # the outcome on a line of its own, even after output without a last newline
        sys.stderr.write("\n")
    _summary(name, jobs)
    if run.get("tag_when_done"):  # `dstack run -t TAG`: did it get it?
        final = client.run(None, name)
        workflow, tags, tag = final["workflow"], final.get("tags") or [], final["tag_when_done"]
        if tags:
            sys.stderr.write(f"Tagged {', '.join(f'{workflow}:{t}' for t in tags)}\n")
        elif final["status"] != JobStatus.DONE:
            sys.stderr.write(f"Not tagged {workflow}:{tag}: the run is {final['status']}\n")
    # a job that failed says why the run did (a multi-node run's others were stopped for it)
    failed = [exit_code_of(j) for j in jobs if j["status"] == JobStatus.FAILED]
    return next((c for c in [*failed, *(exit_code_of(j) for j in jobs)] if c), 0)


def _announce_ports(job: dict) -> None:
    """Where the job's ports (PORT_0, ...) can be reached; apps must bind 0.0.0.0 or the runner's host."""
    host = job.get("hostname") or "127.0.0.1"
    for i, port in enumerate(job.get("ports") or []):
        sys.stderr.write(f"PORT_{i}: http://{printable(host)}:{port}\n")


def _summary(run_name: str, jobs: list[dict]) -> None:
    """A line per job: `lazy-bobcat-1 DONE in 0.4s`, or FAILED with the reason and exit code; the jobs of a
    multi-node run by rank (`lazy-bobcat-1 rank 1 DONE in 0.4s`)."""
    err = sys.stderr
    color = err.isatty()
    for rank, job in enumerate(jobs):
        who = f"{run_name} rank {rank}" if len(jobs) > 1 else run_name
        status, reason, exit_code = job["status"], job.get("reason"), job.get("exit_code")
        took = f" in {job['seconds']:.1f}s" if job.get("seconds") is not None else ""
        detail = ""
        if status != JobStatus.DONE:
            detail = f": {printable(reason)}" if reason else ""
            if exit_code not in (None, 0) and "code" not in (reason or ""):
                detail += f" (exit code {exit_code})"
        mark = {"DONE": "\033[32m", "FAILED": "\033[31m"}.get(status, "\033[33m") if color else ""
        off = "\033[0m" if color else ""
        err.write(f"{mark}{who} {status}{off}{took}{detail}\n")


def _why_waiting(client: Client, run: dict, job_id: str) -> str | None:
    """What the server says of a queued job (a backend whose runners fail to start, and why), if anything."""
    try:
        jobs = client.run(run.get("repo_id"), run["run_name"]).get("jobs") or []
    except Exception:  # only a better message is lost
        return None
    return next((j.get("reason") for j in jobs if j.get("job_id") == job_id and j.get("reason")), None)
