"""Warm containers: a job's container, created and started before the job arrives.

Creating and starting a container is most of what `docker run` costs (~150 ms, runc). So once a Docker
job has ended, its runner starts one container for the next job of the same kind: the same image, GPUs
and shared memory, its /workflow bound to an empty folder. The container's shell checks that the image
has `env`, says it is ready, and then execs a shell that reads its script from a FIFO in a second,
read-only folder. When such a job comes:
- its code is recreated in the first folder, and the runner attaches to the container's output;
- two lines go through the FIFO (nothing is written to disk): `cd` to the working dir, then
  `exec env -u OLDPWD -u SHLVL -u _ -- NAME=VALUE... /bin/sh -c SCRIPT`.

Every step is an exec, so the job's shell is PID 2 under the same init, with the same `$0`, arguments,
environment and working dir as in a container created for it (`/bin/sh -c SCRIPT` with the variables in
the container's environment): SIGTERM reaches it, and a shell execs its last command, exactly as there.
What still shows: PID 1's command line and the read-only `/.dstack-runner` folder; `docker exec` into the
container does not get the job's variables (they are the job's, not the container's); the container has
no `dstack.job_id` label (it is renamed `dstack-<job_id>`); and its image is in use while it waits.
Each container runs one job and is removed after it; the runner warms up the next one after the job's
final status is reported, and removes the waiting one when it exits.

A job starts cold (create + start) when warming cannot be exact:
- its image has an ENTRYPOINT (the entrypoint runs at start-up, before the job's environment is known),
  or no `/bin/sh` or `env` (its container exits by itself before it is ready: such an image is not tried
  again; a warm-up that Docker failed, e.g. while its daemon restarted, is tried again after a back-off);
- it has dependencies (their read-only mounts are made when the container is created);
- its project lies in a subfolder of the repository, or it has no commands;
- the image's tag moved to another image meanwhile, or the waiting container is gone;
- DSTACK_WARM_CONTAINERS=0 in the runner's environment.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstack.core.models import JobSpec
from dstack.runner.executors.base import job_script, relative_working_dir

CONTROL = "/.dstack-runner"  # the control folder, read-only, inside a warm container
READY = b"dstack-runner: waiting for a job"
# the container's command: check for `env`, say so, then read the job's two lines from the FIFO
WAIT_SCRIPT = (f"command -v env >/dev/null 2>&1 || exit 124\n"
               f"echo '{READY.decode()}'\n"
               f"exec /bin/sh {CONTROL}/go\n")
READY_TIMEOUT = 10.0  # seconds for a container that started to say it is ready
GO_TIMEOUT = 2.0  # seconds for a ready container's shell to open the FIFO
MAX_KINDS = 2  # warm containers kept per runner, one per kind of job (the most recent kinds)
_SURROGATES = re.compile("[\ud800-\udfff]")


def enabled() -> bool:
    return os.environ.get("DSTACK_WARM_CONTAINERS", "1").strip().lower() not in ("0", "false", "no", "off")


def kind(job: JobSpec) -> tuple | None:
    """What a warm container for `job` must share with it; None when `job` cannot use one."""
    if not job.image or not job.commands or job.dependencies or job.entrypoint or not enabled():
        return None
    if job.code is not None and job.code.subdir not in ("", "."):
        return None
    gpus = tuple(job.gpu_indexes) if job.gpu_indexes is not None else job.requirements.gpu_count
    return job.image, gpus, job.requirements.shm_size_mib


class WarmUpFailed(Exception):
    """Docker could not start a container that waits, this time (not for a lack of the image): tried again later."""


@dataclass
class WarmContainer:
    kind: tuple
    container: Any  # docker.models.containers.Container
    root: Path  # bound at /workflow: the job's code goes here
    control: Path  # bound at CONTROL: the FIFO `go`
    image_id: str


def control_folder(root: Path) -> Path:
    """The control folder of the warm container whose /workflow is `root`: next to it, never inside."""
    return root.with_name(root.name + ".control")


def prepare_folders(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    control = control_folder(root)
    shutil.rmtree(control, ignore_errors=True)  # a previous container's, when `root` is used again
    control.mkdir(parents=True)
    control.chmod(0o755)  # whatever the runner's umask: the image's USER, whoever it is, opens the FIFO
    os.mkfifo(control / "go")
    (control / "go").chmod(0o644)
    return control


def wait_ready(output: Any) -> bool:
    """Whether the container said it is ready, on its output stream (which is closed here, at the latest
    after READY_TIMEOUT)."""
    seen = b""
    watchdog = threading.Timer(READY_TIMEOUT, output.close)
    watchdog.start()
    try:
        for chunk in output:
            seen += chunk
            if READY in seen:
                return True
            if len(seen) > 4096:
                return False
        return False  # it exited (no /bin/sh or no env)
    except Exception:  # closed by the watchdog, or the connection broke
        return False
    finally:
        watchdog.cancel()
        output.close()


def launch_lines(job: JobSpec, container_root: str, env: dict[str, str]) -> bytes:
    """What the waiting shell reads from the FIFO: to the working dir, then exec the job's shell with its
    variables, as `/bin/sh -c SCRIPT` in a container created for it would start."""
    wd = relative_working_dir(job.working_dir)
    cwd = container_root if wd == "." else f"{container_root}/{wd}"
    assignments = " ".join(shlex.quote(f"{name}={value}") for name, value in env.items())
    text = (f"cd -- {shlex.quote(cwd)} || exit 126\n"
            f"exec env -u OLDPWD -u SHLVL -u _ -- {assignments} /bin/sh -c {shlex.quote(job_script(job.commands))}\n")
    return _SURROGATES.sub("\ufffd", text).encode("utf-8")


def go(warm: WarmContainer, lines: bytes, alive: Callable[[], bool]) -> bool:
    """Hand the job's lines to the waiting shell. False when none waits (the container died: `alive()`)."""
    deadline = time.monotonic() + GO_TIMEOUT
    while True:
        try:
            # non-blocking: fails with ENXIO rather than hanging when no reader holds the FIFO
            fd = os.open(warm.control / "go", os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() >= deadline or not alive():
                return False
            time.sleep(0.01)  # it said it is ready and is about to open the FIFO
    try:
        os.set_blocking(fd, True)  # the shell reads while it parses: long lines pass the pipe's buffer
        view = memoryview(lines)
        while view:
            view = view[os.write(fd, view):]
        return True
    except OSError:  # it died meanwhile (EPIPE)
        return False
    finally:
        os.close(fd)


def remove_folders(warm: WarmContainer) -> None:
    """The folders of a warm container that no job used."""
    shutil.rmtree(warm.control, ignore_errors=True)
    try:
        warm.root.rmdir()
    except OSError:
        pass
