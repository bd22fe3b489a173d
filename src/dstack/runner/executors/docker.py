"""Runs a job in a Docker container of its image, through the Docker SDK.

The job's root folder is bind-mounted read-write at /workflow, each mount at /workflow/<target>,
and the working dir is /workflow/<working_dir>. The container uses host networking (no NAT, nothing
on Docker's bridge), a tty (prompt, unmangled output) and Docker's init as PID 1, so that SIGTERM
reaches the job's shell: a shell that is PID 1 itself ignores it.

After a job, the runner asks for a warm container for the next job of its kind (`warm`); the next such
job claims it (`claim`) and starts in it without Docker's create and start (see warm.py).

A restart of the Docker daemon is survived (see docker_daemon.py): a job it killed fails saying so
(`failure_reason`), a daemon that died is waited for, a container it could not remove meanwhile is removed
once it is back, and a warm-up it broke is tried again later.
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.types import DeviceRequest
from docker.utils import parse_repository_tag

from dstack.core.models import JobSpec
from dstack.runner.executors import warm as warmup
from dstack.runner.executors.base import (
    ExecutorError,
    Mount,
    OutputCallback,
    job_env,
    job_script,
    pick_free_ports,
    relative_working_dir,
)
from dstack.runner.executors.docker_daemon import (
    DOCKER_ERRORS,
    Removals,
    accepts_connections,
    wait_until_back,
)
from dstack.runner.executors.orphans import _runner_labels

log = logging.getLogger(__name__)

CONTAINER_ROOT = "/workflow"
TERMINAL_ROWS, TERMINAL_COLUMNS = 24, 80
DRAIN_TIMEOUT = 10.0  # seconds to wait for the rest of the output once the container exited
CLOSE_TIMEOUT = 10.0  # seconds `close` waits for a container being warmed up, to remove it too
RENAME_AFTER = 0.1  # seconds into a job in a warm container before it is renamed dstack-<job_id>
EXIT_TIMEOUT = 2.0  # seconds for a warm container that did not say it was ready to have exited
DAEMON_BACK_TIMEOUT = 60.0  # seconds a job's wait waits for a Docker daemon that went away to be back
WARM_RETRY_FIRST, WARM_RETRY_MAX = 1.0, 300.0  # seconds before a kind whose warm-up failed is tried again, doubling


class DockerExecution:
    def __init__(
        self,
        container: Container,
        output: Any,
        on_output: OutputCallback,
        image_digest: str | None,
        ports: list[int],
        warm: bool = False,
        removals: Removals | None = None,
    ) -> None:
        self.image_digest = image_digest
        self._removals = removals  # the executor's: they outlive the daemon's restarts
        self.ports = ports
        self.warm = warm  # started in a warm container
        # why the job failed when its exit code does not say it (e.g. the Docker daemon killed it), else None
        self.failure_reason: str | None = None
        self.container = container
        self._output = output
        self._on_output = on_output
        self._lock = threading.Lock()
        self._exit_code: int | None = None
        self._renaming: threading.Timer | None = None
        self._stop_wanted = threading.Event()  # a stop that the daemon, away, could not do
        self._reader = self._read(output)

    def _read(self, output: Any) -> threading.Thread:
        reader = threading.Thread(target=self._pump, args=(output,), daemon=True,
                                  name=f"dstack-docker-output-{self.container.short_id}")
        reader.start()
        return reader

    def _pump(self, output: Any) -> None:
        try:
            for chunk in output:
                try:
                    self._on_output(chunk)
                except Exception:
                    log.exception("on_output failed; the job's output goes on")
        except Exception as e:  # the stream broke (engine restarted, container removed)
            log.warning("output of container %s ended early: %s", self.container.short_id, e)

    def wait(self) -> int:
        with self._lock:
            if self._exit_code is not None:
                return self._exit_code
            code = self._wait()
            self._reader.join(DRAIN_TIMEOUT)
            if self._reader.is_alive():
                self._output.close()
            if self._renaming is not None:
                self._renaming.cancel()
            if code != 0 and self.failure_reason is None and not accepts_connections(self.container.client):
                # it stops: it closed its socket, then stopped the containers (unless --live-restore)
                self.failure_reason = f"the Docker daemon stopped while the job ran (exit code {code})"
            self._exit_code = code
            return code

    def _wait(self) -> int:
        """The container's exit code, once it exited; through restarts of the daemon."""
        while True:
            try:
                return int(self.container.wait().get("StatusCode", 1))
            except docker.errors.NotFound:
                return 137  # removed behind our back
            except requests.exceptions.RequestException as e:  # the daemon went away: died, or killed
                log.warning("the Docker daemon went away while container %s ran (%s); waiting for it",
                            self.container.short_id, e)
                try:
                    back = wait_until_back(self.container, DAEMON_BACK_TIMEOUT, self._stop_wanted)
                except docker.errors.NotFound:
                    return 137
                except DOCKER_ERRORS as e2:
                    raise ExecutorError(f"lost the job's container {self.container.short_id}: {e2}") from e2
                if not back and self._stop_wanted.is_set():
                    raise ExecutorError(f"the Docker daemon went away while the job ran, and the job was stopped "
                                        f"before it was back ({e})") from e
                if not back:
                    raise ExecutorError(f"the Docker daemon went away while the job ran and was not back within "
                                        f"{DAEMON_BACK_TIMEOUT:.0f} s ({e})") from e
                state = self.container.attrs.get("State") or {}
                if not state.get("Running"):  # it stopped the container when it started again
                    code = int(state.get("ExitCode", 1))
                    if code != 0:
                        self.failure_reason = f"the Docker daemon restarted while the job ran (exit code {code})"
                    return code
                self._reattach()  # it runs on (--live-restore): its output comes through a new stream
            except DOCKER_ERRORS as e:
                raise ExecutorError(f"lost the job's container {self.container.short_id}: {e}") from e

    def _reattach(self) -> None:
        """Read the output of a container that outlived its daemon's restart again (what it wrote while the
        daemon was away is lost)."""
        self._reader.join(DRAIN_TIMEOUT)  # the old stream broke with the daemon
        try:
            self._output = self.container.attach(stream=True, logs=False)
        except DOCKER_ERRORS as e:
            log.warning("could not read the output of container %s again: %s", self.container.short_id, e)
            return
        self._reader = self._read(self._output)

    def dispose(self) -> None:
        """Remove the container, in the background: once the job's end is reported, not while it is."""
        if self._removals is None:
            self._removals = Removals()
        self._removals.remove(self.container, wait=False)

    def rename_later(self, name: str) -> None:
        """Name the container for `docker ps` once the job has run for RENAME_AFTER seconds (a job that ends
        sooner is not slowed by the request)."""
        self._renaming = threading.Timer(RENAME_AFTER, _rename, args=(self.container, name))
        self._renaming.daemon = True
        self._renaming.start()

    def stop(self, grace: float = 10.0) -> None:
        if self._exit_code is not None:
            return
        try:
            # SIGTERM (the image's stop signal), SIGKILL after `t` whole seconds; returns once it is dead
            self.container.stop(timeout=max(0, math.ceil(grace)))
        except docker.errors.NotFound:
            pass  # wait() removed it meanwhile
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: its removal is in progress
                raise ExecutorError(f"could not stop container {self.container.short_id}: {e}") from e
        except requests.exceptions.RequestException as e:  # the daemon is away: wait() waits for it no more
            self._stop_wanted.set()
            raise ExecutorError(f"could not stop container {self.container.short_id}: Docker is unreachable "
                                f"({e})") from e


class DockerExecutor:
    """Runs jobs in containers of their image; the image must be present or pullable."""

    binds_anywhere = True

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._warm: dict[tuple, warmup.WarmContainer] = {}  # by kind, the most recently warmed last
        self._claimed: dict[str, warmup.WarmContainer] = {}  # by job id, until the job starts
        self._warming: set[tuple] = set()  # kinds whose container is being started
        self._starting: dict[tuple, Container] = {}  # their containers, once created
        self._unwarmable: set[str] = set()  # ids of images whose containers cannot wait for jobs
        self._warm_later: dict[tuple, tuple[float, float]] = {}  # kinds whose warm-up failed: (when, back-off)
        self._removals = Removals()  # of containers that Docker could not remove yet
        self._changed = threading.Condition(self._lock)
        self._closed = False

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env()
            except DOCKER_ERRORS as e:
                raise ExecutorError(f"Docker is not reachable: {e}") from e
        return self._client

    def start(
        self,
        job: JobSpec,
        root: Path,
        mounts: list[Mount],
        env: dict[str, str],
        on_output: OutputCallback,
    ) -> DockerExecution:
        if not job.image:
            raise ExecutorError(f"job {job.job_id} has no image; the host executor runs such jobs")
        with self._lock:
            claimed = self._claimed.pop(job.job_id, None)
        if claimed is not None:
            try:
                execution = self._start_warm(claimed, job, root, mounts, env, on_output)
            except BaseException:
                self._discard(claimed, keep_root=True)
                raise
            if execution is not None:
                return execution
            self._discard(claimed, keep_root=True)  # the job's code is in its folder: started cold below
        client = self.client
        try:
            image = self._image(job.image, on_output)
            root = Path(root).resolve()
            root.mkdir(parents=True, exist_ok=True)  # a bind mount's source must be there
            ports = pick_free_ports(job.ports)
            environment = job_env(job, ports, env)
            if any(m.target.startswith("~/") for m in mounts):  # folders in its home: HOME says where they are
                environment.setdefault("HOME", _image_home(image))
            binds = [docker.types.Mount(CONTAINER_ROOT, str(root), type="bind")]
            seen = {CONTAINER_ROOT}
            for mount in mounts:
                target = _container_path(mount.target, environment.get("HOME", "/"))
                if target in seen:
                    raise ExecutorError(f"two folders would be mounted at {target} in the container (an artifact, "
                                        "a dependency's artifact or a cache at one path): give them different paths")
                seen.add(target)
                binds.append(docker.types.Mount(target, str(Path(mount.source).resolve()), type="bind",
                                                read_only=mount.read_only))
            working_dir = relative_working_dir(job.working_dir)
            name = f"dstack-{job.job_id}" if job.job_id else None
            if name:
                self._remove_stale(name)
            container = client.containers.create(
                image.id,
                # `entrypoint` (the workflow's): it gets the commands as one script (`bash -c`, `python -c` ...)
                entrypoint=job.entrypoint,
                command=(([job_script(job.commands)] if job.entrypoint else ["/bin/sh", "-c", job_script(job.commands)])
                         if job.commands else None),
                working_dir=CONTAINER_ROOT if working_dir == "." else f"{CONTAINER_ROOT}/{working_dir}",
                environment=environment,
                mounts=binds,
                labels={"dstack.job_id": job.job_id, "dstack.run_name": job.run_name, **_runner_labels()},
                name=name,
                **_container_options(job),
            )
            output = _attach_and_start(container, self._removals)
        except DOCKER_ERRORS as e:
            raise ExecutorError(
                f"could not start the container of job {job.job_id} ({job.image}): {e}"
            ) from e
        self._removals.retry_now()  # Docker answers: what it could not remove before goes now
        return DockerExecution(container, output, on_output, _digest(image, job.image), ports,
                               removals=self._removals)

    # --- warm containers (warm.py) -------------------------------------------------------------------

    def warm(self, job: JobSpec, root: Path) -> bool:
        """Start a container that waits for the next job of `job`'s kind, its /workflow bound to `root`
        (made here, empty). False when such jobs cannot use one, or one waits already."""
        kind = warmup.kind(job)
        with self._lock:
            if kind is None or self._closed or kind in self._warm or kind in self._warming:
                return False
            if time.monotonic() < self._warm_later.get(kind, (0.0, 0.0))[0]:
                return False  # it failed a moment ago: tried again after its back-off
            self._warming.add(kind)
        ready, stale = None, []
        try:
            ready = self._start_waiting(job, kind, Path(root).resolve())
            with self._lock:
                if ready is not None and self._closed:
                    stale.append(ready)
                elif ready is not None:
                    while len(self._warm) >= warmup.MAX_KINDS:  # the least recently warmed kind goes
                        stale.append(self._warm.pop(next(iter(self._warm))))
                    self._warm[kind] = ready
                    self._warm_later.pop(kind, None)
                    log.info("container %s waits for the next job of %s", ready.container.short_id, job.image)
        except (warmup.WarmUpFailed, ExecutorError, *DOCKER_ERRORS, OSError) as e:  # e.g. its daemon restarted
            self._try_later(kind, f"could not warm up a container for {job.image}: {e}")
        finally:
            for old in stale:
                self._discard(old)
            with self._lock:
                self._warming.discard(kind)
                self._changed.notify_all()
        return ready is not None and ready not in stale

    def _try_later(self, kind: tuple, message: str) -> None:
        with self._lock:
            backoff = min(2 * self._warm_later.get(kind, (0.0, WARM_RETRY_FIRST / 2))[1], WARM_RETRY_MAX)
            self._warm_later[kind] = (time.monotonic() + backoff, backoff)
        log.warning("%s; tried again in %.0f s at the earliest", message, backoff)

    def _start_waiting(self, job: JobSpec, kind: tuple, root: Path) -> warmup.WarmContainer | None:
        """A container of `kind` that waits for a job; None when its image cannot have one (then it is
        never tried again) or the executor closed. `WarmUpFailed` when Docker failed: tried again later."""
        image = self._image(job.image)
        if (image.attrs.get("Config") or {}).get("Entrypoint") or image.id in self._unwarmable:
            return None  # an entrypoint would run before the job's environment is known: such jobs start cold
        control = warmup.prepare_folders(root)
        ready = warmup.WarmContainer(kind, None, root, control, image.id)
        try:
            ready.container = self.client.containers.create(
                image.id,
                command=["/bin/sh", "-c", warmup.WAIT_SCRIPT],
                working_dir=CONTAINER_ROOT,
                volumes={str(root): {"bind": CONTAINER_ROOT, "mode": "rw"},
                         str(control): {"bind": warmup.CONTROL, "mode": "ro"}},
                labels={"dstack.warm": "1", **_runner_labels()},
                name=f"dstack-warm-{secrets.token_hex(6)}",
                **_container_options(job),
            )
            with self._lock:  # close() removes it from here on, rather than wait for it to be ready
                closing = self._closed
                self._starting[kind] = ready.container
            if not closing and warmup.wait_ready(_attach_and_start(ready.container, self._removals)):
                self._removals.retry_now()  # Docker answers: what it could not remove before goes now
                return ready
            exit_code = None if closing else _own_exit_code(ready.container)
        except DOCKER_ERRORS as e:
            self._discard(ready)
            raise warmup.WarmUpFailed(str(e)) from e
        except BaseException:
            self._discard(ready)
            raise
        finally:
            with self._lock:
                self._starting.pop(kind, None)
        self._discard(ready)
        if self._closed:
            return None
        if exit_code is None:  # killed (e.g. by its daemon's restart), or slow: not the image's fault
            raise warmup.WarmUpFailed("its container did not say it was ready")
        self._unwarmable.add(image.id)  # for this runner's life: its jobs start cold, as they always can
        log.info("no container of %s can wait for jobs (it exited with code %d before it said it was ready: no "
                 "/bin/sh or no env in the image?): its jobs start cold", job.image, exit_code)
        return None

    def claim(self, job: JobSpec) -> Path | None:
        """The folder bound at /workflow of a warm container that will run `job` (its code goes there), or
        None. `start` then runs `job` in that container; `release` removes it if `start` never came."""
        kind = warmup.kind(job)
        with self._lock:
            ready = self._warm.pop(kind, None) if kind is not None else None
            if ready is None:
                return None
            self._claimed[job.job_id] = ready
        return ready.root

    def release(self, job: JobSpec) -> None:
        """Remove the warm container `job` claimed and did not start in (its folder stays the caller's)."""
        with self._lock:
            claimed = self._claimed.pop(job.job_id, None)
        if claimed is not None:
            self._discard(claimed, keep_root=True)

    def close(self) -> None:
        """Remove the containers that wait for jobs, and finish removing those of ended jobs; warm no more."""
        deadline = time.monotonic() + CLOSE_TIMEOUT
        with self._lock:
            self._closed = True
            starting = list(self._starting.values())
        for container in starting:  # being warmed up: removed now, its warm-up ends at once
            self._removals.remove(container)
        with self._lock:
            self._changed.wait_for(lambda: not self._warming, timeout=CLOSE_TIMEOUT)
            waiting = [*self._warm.values(), *self._claimed.values()]
            self._warm.clear()
            self._claimed.clear()
        for ready in waiting:
            self._discard(ready)
        # daemon threads: they would die with the runner mid-way
        self._removals.close(max(0.0, deadline - time.monotonic()))

    def _start_warm(self, ready: warmup.WarmContainer, job: JobSpec, root: Path, mounts: list[Mount],
                    env: dict[str, str], on_output: OutputCallback) -> DockerExecution | None:
        """`job` in the container that waits for it; None (with the reason logged) when it must start cold."""
        image = self._image(job.image)
        if mounts:
            why = "it mounts folders"
        elif Path(root).resolve() != ready.root:
            why = f"its code is in {root}, not in the waiting container's {ready.root}"
        elif image.id != ready.image_id:
            why = f"{job.image} is another image now"
        else:
            ports = pick_free_ports(job.ports)
            (ready.root / relative_working_dir(job.working_dir)).mkdir(parents=True, exist_ok=True)
            lines = warmup.launch_lines(job, CONTAINER_ROOT, job_env(job, ports, env))
            try:
                output = ready.container.attach(stream=True, logs=False)  # before the go: no output is lost
            except DOCKER_ERRORS:
                output = None
            if output is not None and warmup.go(ready, lines, alive=lambda: _running(ready.container)):
                execution = DockerExecution(ready.container, output, on_output, _digest(image, job.image), ports,
                                            warm=True, removals=self._removals)
                execution.rename_later(f"dstack-{job.job_id}")
                return execution
            if output is not None:
                output.close()
            why = "the waiting container is gone"
        log.info("job %s starts in a new container: %s", job.job_id, why)
        return None

    def _discard(self, ready: warmup.WarmContainer, keep_root: bool = False) -> None:
        if ready.container is not None:
            self._removals.remove(ready.container)
        if keep_root:
            shutil.rmtree(ready.control, ignore_errors=True)
        else:
            warmup.remove_folders(ready)

    def _image(self, name: str, say=None):
        """The image, pulled when it is not on this machine (`say` hears that it is, in the job's output)."""
        try:
            return self.client.images.get(name)
        except docker.errors.ImageNotFound:
            pass
        except requests.exceptions.RequestException as e:
            raise ExecutorError(f"Docker is not reachable: {e}") from e
        except docker.errors.DockerException as e:
            raise ExecutorError(f"Docker could not look up image {name}: {_api_message(e)}") from e
        if say is not None:
            say(f"dstack: pulling image {name} (it is not on this machine)\r\n".encode())
        try:
            return self.client.images.pull(name)
        except DOCKER_ERRORS as e:
            raise ExecutorError(
                f"image {name} not found locally and could not be pulled: {_api_message(e)}"
            ) from e

    def _remove_stale(self, name: str) -> None:
        """A container of the same job left by a runner that died: it must go before a restart."""
        try:
            self.client.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass


def _container_path(target: str, home: str) -> str:
    """Where a mount goes in the container: an absolute target as it is, `~/x` in `home`, anything else under the
    job's root."""
    if target.startswith("/"):
        return target
    if target.startswith("~/"):
        return f"{home.rstrip('/')}/{target[2:]}"
    relative = relative_working_dir(target)
    if relative == ".":
        raise ExecutorError(f"a mount at '{target}' would hide the job's root folder")
    return f"{CONTAINER_ROOT}/{relative}"


def _image_home(image: Any) -> str:
    """The HOME of the image's user: its `HOME=` setting, else root's or /home/<user> (also for a uid: Docker would
    give a user with no account `/`, where the job may not write)."""
    config = image.attrs.get("Config") or {}
    for item in config.get("Env") or []:
        if item.startswith("HOME="):
            return item[5:] or "/"
    user = (config.get("User") or "").split(":")[0]
    return "/root" if user in ("", "root", "0") else f"/home/{user}"


def _container_options(job: JobSpec) -> dict[str, Any]:
    """What a job's container is created with, cold or warm, besides its command, folders and names."""
    gpus = job.requirements.gpu_count
    shm = job.requirements.shm_size_mib
    # the GPUs the server gave it, by index (never one another job has); by count from a server before 0.4
    devices = (DeviceRequest(device_ids=[str(i) for i in job.gpu_indexes], capabilities=[["gpu"]])
               if job.gpu_indexes else DeviceRequest(count=gpus, capabilities=[["gpu"]]))
    return {
        "tty": True,
        "init": True,
        "network_mode": "host",
        "shm_size": f"{shm}m" if shm else None,
        "device_requests": [devices] if gpus else None,
        "auto_remove": False,
    }


def _attach_and_start(container: Container, removals: Removals) -> Any:
    """Its output stream, attached before the start so that no early output is lost."""
    try:
        output = container.attach(stream=True, logs=False)
        container.start()
    except DOCKER_ERRORS:
        removals.remove(container)
        raise
    # best effort, as `docker run -t` does (Engine 20.10 starts a tty at 0x0); off the critical path
    threading.Thread(target=_resize, args=(container,), daemon=True).start()
    return output


def _own_exit_code(container: Container) -> int | None:
    """The exit code of a container that ended by itself; None when it runs on, was killed (128+N: e.g. by its
    daemon, which stops), or Docker cannot say."""
    try:
        code = int(container.wait(timeout=EXIT_TIMEOUT).get("StatusCode", 1))
    except DOCKER_ERRORS:
        return None
    return code if code < 128 and accepts_connections(container.client) else None


def _running(container: Container) -> bool:
    try:
        container.reload()
    except DOCKER_ERRORS:
        return False
    return container.status == "running"


def _rename(container: Container, name: str) -> None:
    try:
        container.rename(name)
    except DOCKER_ERRORS:
        pass  # a name is for people reading `docker ps`


def _digest(image: Any, name: str) -> str:
    """The registry digest when the image came from one (reproducible elsewhere), else its id."""
    repo_digests: list[str] = image.attrs.get("RepoDigests") or []
    repository, _ = parse_repository_tag(name)
    for digest in repo_digests:
        if digest.split("@")[0] == repository:
            return digest
    return repo_digests[0] if repo_digests else image.id


def _api_message(e: Exception) -> str:
    explanation = getattr(e, "explanation", None)
    return str(explanation or e)


def _resize(container: Container) -> None:
    try:
        container.resize(height=TERMINAL_ROWS, width=TERMINAL_COLUMNS)
    except DOCKER_ERRORS:
        pass
