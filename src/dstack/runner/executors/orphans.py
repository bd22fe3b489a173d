"""Which runner made a job's container, and the sweep of containers whose runner died: labels put on each
container at its creation (executors/docker.py), read by the next runner that starts on the machine."""

from __future__ import annotations

import os

import docker
import docker.errors

from dstack.core.processes import is_running, start_time
from dstack.runner.executors.docker_daemon import DOCKER_ERRORS

INIT_PID_NS = "4026531836"  # the inode of the host's (the initial) pid namespace: PROC_PID_INIT_INO
RUNNER_CONTAINER_ENV = "DSTACK_RUNNER_CONTAINER"  # the name of the container the runner runs in (docker backend)


def _runner_labels() -> dict[str, str]:
    """Whose container this is: `remove_orphans` removes those whose runner died. The pid is the runner's in its
    own pid namespace, which the labels name (a runner in a container has one of its own); a runner of the
    `docker` backend names its container too (DSTACK_RUNNER_CONTAINER, set by backends/docker.py)."""
    labels = {"dstack.runner_pid": str(os.getpid()), "dstack.runner_started": str(start_time(os.getpid())),
              "dstack.boot_id": _boot_id(), "dstack.pid_ns": _pid_ns()}
    if os.environ.get(RUNNER_CONTAINER_ENV):
        labels["dstack.runner_container"] = os.environ[RUNNER_CONTAINER_ENV]
    return labels


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    """This process's pid namespace: the inode of /proc/self/ns/pid (the host's is 4026531836)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return INIT_PID_NS


def remove_orphans(client: docker.DockerClient | None = None) -> list[str]:
    """Remove job containers whose runner died (SIGKILL, crash) on this machine since this boot.

    A container outlives its runner's death; the runner that starts next on the machine cleans up. A runner's
    pid means something only in its own pid namespace: a container of a runner in another one (a runner in a
    container of the `docker` backend, or beside one) is judged by that runner's container, when its labels name
    it (gone or stopped: an orphan), and otherwise left alone."""
    try:
        client = client or docker.from_env()
        containers = client.containers.list(all=True, filters={"label": "dstack.runner_pid"})
    except DOCKER_ERRORS:
        return []
    removed = []
    mine, boot = _pid_ns(), _boot_id()
    for c in containers:
        labels = c.labels
        if labels.get("dstack.boot_id") != boot or not _orphaned(client, labels, mine):
            continue
        try:
            c.remove(force=True)
            # a container that waited for a job and ran none has no job id
            removed.append(labels.get("dstack.job_id") or f"none (it waited for one: {c.name})")
        except DOCKER_ERRORS:
            pass
    return removed


def _orphaned(client: docker.DockerClient, labels: dict, pid_ns: str) -> bool:
    """Whether the runner that made a container (of this boot) is gone, as far as this process can tell."""
    # an older runner's containers name no namespace: it ran in the host's (or shared it: pid_mode host)
    if labels.get("dstack.pid_ns", INIT_PID_NS) == pid_ns:
        return not _runner_alive(labels)
    runner_container = labels.get("dstack.runner_container")
    if not runner_container:
        return False  # its runner's pid is of a namespace this process cannot see into
    try:
        return client.containers.get(runner_container).status not in ("running", "paused", "restarting")
    except docker.errors.NotFound:
        return True
    except DOCKER_ERRORS:
        return False


def _runner_alive(labels: dict) -> bool:
    """Whether the runner that made a container still runs: its pid and start time (a pid alone may be
    another program's by now; containers of runners before 0.3.1 have the pid only)."""
    pid = int(labels.get("dstack.runner_pid", "0") or 0)
    started = labels.get("dstack.runner_started")
    if started and started.isdigit():
        return is_running(pid, int(started))
    return _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False
