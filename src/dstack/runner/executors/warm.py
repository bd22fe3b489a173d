"""Warm containers: a job's container, created and started before the job arrives.

Creating and starting a container is most of what `docker run` costs (~150 ms, runc). So once a Docker
job has ended, its runner starts one container for the next job of the same kind: the same image, GPUs
and shared memory. That container's /workflow is bound to an empty folder and its shell waits on a FIFO
in a second, read-only folder. When such a job comes:
- its code is recreated in the first folder;
- its script (cd to the working dir, its environment exported, its commands) goes into the second;
- a line written to the FIFO lets the shell source that script.

From there the job runs exactly as in a container started for it: the same init as PID 1, the same
shell (`/bin/sh`, `$0` included), terminal, user, network, and SIGTERM on stop. Each container runs one
job and is removed after it; the runner warms up the next one after the job's final status is reported.

A job starts cold (create + start) when warming cannot be exact:
- its image has an ENTRYPOINT (the entrypoint runs at start-up, before the job's environment is known);
- it has dependencies (their read-only mounts are made when the container is created);
- its project lies in a subfolder of the repository, or it has no commands;
- a variable name is not a shell name, the image's tag moved to another image meanwhile, or the
  waiting container is gone;
- DSTACK_WARM_CONTAINERS=0 in the runner's environment.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstack.core.models import JobSpec
from dstack.runner.executors.base import job_env, job_script, relative_working_dir

CONTROL = "/.dstack-runner"  # the control folder, read-only, inside a warm container
# the container's command: wait for the go, then run the job's script in this very shell
WAIT_SCRIPT = f"read _ < {CONTROL}/go || exit 125\n. {CONTROL}/job.sh\n"
GO_TIMEOUT = 2.0  # seconds for a container that just started to reach its FIFO
MAX_KINDS = 2  # warm containers kept per runner, one per kind of job (the most recent kinds)
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def enabled() -> bool:
    return os.environ.get("DSTACK_WARM_CONTAINERS", "1").strip().lower() not in ("0", "false", "no", "off")


def kind(job: JobSpec) -> tuple | None:
    """What a warm container for `job` must share with it; None when `job` cannot use one."""
    if not job.image or not job.commands or job.dependencies or not enabled():
        return None
    if job.code is not None and job.code.subdir not in ("", "."):
        return None
    return job.image, job.requirements.gpu_count, job.requirements.shm_size_mib


@dataclass
class WarmContainer:
    kind: tuple
    container: Any  # docker.models.containers.Container
    output: Any  # its attached output stream, opened before its start
    root: Path  # bound at /workflow: the job's code goes here
    control: Path  # bound at CONTROL: the FIFO `go` and, once claimed, `job.sh`
    image_id: str


def control_folder(root: Path) -> Path:
    """The control folder of the warm container whose /workflow is `root`: next to it, never inside."""
    return root.with_name(root.name + ".control")


def prepare_folders(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    control = control_folder(root)
    shutil.rmtree(control, ignore_errors=True)  # a previous container's, when `root` is used again
    control.mkdir(parents=True)
    os.mkfifo(control / "go", 0o644)  # readable by the image's USER, whoever it is
    return control


def script(job: JobSpec, container_root: str, ports: list[int], env: dict[str, str]) -> str | None:
    """The job's script for a warm container's shell; None when a variable's name is not a shell name."""
    variables = job_env(job, ports, env)
    if not all(_SHELL_NAME.match(name) for name in variables):
        return None
    wd = relative_working_dir(job.working_dir)
    cwd = container_root if wd == "." else f"{container_root}/{wd}"
    lines = [f"cd -- {shlex.quote(cwd)} || exit 126"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    return "\n".join(lines) + "\n" + job_script(job.commands) + "\n"


def go(warm: WarmContainer, job_script_text: str) -> bool:
    """Hand the script to the waiting shell. False when no shell waits (the container is gone)."""
    (warm.control / "job.sh").write_text(job_script_text, encoding="utf-8")
    deadline = time.monotonic() + GO_TIMEOUT
    while True:
        try:
            # non-blocking: fails with ENXIO rather than hanging when no reader holds the FIFO
            fd = os.open(warm.control / "go", os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() >= deadline:
                return False
            time.sleep(0.005)  # just started: its shell has not opened the FIFO yet
    try:
        os.write(fd, b"\n")
    finally:
        os.close(fd)
    return True


def remove_folders(warm: WarmContainer) -> None:
    """The folders of a warm container that no job used."""
    shutil.rmtree(warm.control, ignore_errors=True)
    try:
        warm.root.rmdir()
    except OSError:
        pass
