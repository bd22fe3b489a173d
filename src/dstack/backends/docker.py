"""`docker`: each runner is a container on a Docker Engine (this machine's, or another one by `docker_host` or
DOCKER_HOST), of the image `backends/runner_image.py` builds there from this machine's files (nothing is pulled).

Each runner's container has the CPU and memory of its offer as hard limits (`cpus`, `memory`; default: the whole
machine), every GPU of the machine (when the engine is this machine's: the runner's own detection finds them), and
the host's network (`network_mode: host`: no bridge is needed, and a server on loopback is reached at its URL).
Its token is put into the container as a file (0600) before it starts, and the runner removes it once read: it is
in no container's environment or command line. The container's labels (`dstack.server`, `dstack.runner`,
`dstack.backend`) let `list()` find it after a server restart. A runner that exits (idle) leaves its container
exited, with its log, for `describe_failure`; exited ones go at a later `create` once KEEP_EXITED has passed.

Jobs run inside the container with the host executor. The runner runs as root there, so each host job runs as a
uid of its own (runner/job_user.py), which a container allows (it has CAP_SETUID; no `--job-user root` is needed).
What it lacks is CAP_SYS_ADMIN, so jobs get no mount namespace: a job's dependencies are copies, not mounts, and
its uid has no name in /etc/passwd (`id -un` fails). The container is the isolation from the host.

Jobs with an `image` need a Docker daemon: with `docker_jobs: true` the runner gets the engine's socket (its jobs'
containers are siblings of its own: whoever may create runners may then do anything on the engine's machine), and
its folders live in a volume of its own, mounted at the engine's path of it, so that the paths the runner hands
the engine to bind-mount are the engine's too. Its pid namespace is its own (not the host's: host jobs' `kill -1`
as their uid would reach other runners' jobs of the same uid): its job containers carry that namespace and its
container's name (DSTACK_RUNNER_CONTAINER), so that the sweep of job containers whose runner died
(executors/docker.remove_orphans, run by every runner as it starts) judges them by their runner's container, not
by a pid it cannot see; `terminate` removes them with their runner's container. Otherwise the runner starts with
--no-docker.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import secrets
import tarfile
import threading
import time
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dstack.backends import runner_image
from dstack.backends.base import BackendError, Bootstrap, Gpus, Instance, Offer
from dstack.core.processes import runner_stop_wait
from dstack.core.resources import RunnerResources, parse_size_mib

log = logging.getLogger("dstack.server")
TOKEN_DIR, TOKEN_FILE = "/run/dstack", "/run/dstack/runner.token"
ORDER_FILE = "/run/dstack/order.json"  # a spare container's order: the arguments of `start`
SPARE_PREFIX = "dstack-runner-spare-"  # a spare container's name until it becomes a runner's
SPARE_DELAY = 2.0  # seconds after a runner's start before the next spare is made
WORKDIR = "/var/lib/dstack/runner"  # inside the container, without docker_jobs
KEEP_EXITED = 600.0  # seconds an exited runner's container is kept (its log says why it ended)
OFFER_RETRY = 30.0  # seconds before an engine that did not answer is asked again for its size
DEAD = ("exited", "dead", "removing")


class DockerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    docker_host: str | None = None  # e.g. ssh://me@gpu-box, tcp://10.0.0.5:2376; default: DOCKER_HOST, else local
    docker_jobs: bool = False  # runners may run jobs with an image (they get the engine's socket)
    cpus: float | None = Field(None, gt=0)  # of each runner (default: all of the engine's machine)
    memory: str | None = None  # of each runner, e.g. 16GB (default: all of the engine's machine)
    max_runners: int = Field(1, ge=0)  # runners at once

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None and parse_size_mib(v) < 64:
            raise ValueError(f"{v} is less than a runner needs (64 MB at least)")
        return v


class DockerBackend(Gpus):
    settings_model = DockerSettings
    secrets: tuple[str, ...] = ()

    def __init__(self, name: str, settings: dict[str, Any], *, server_id: str, home: Path) -> None:
        try:
            self.settings = DockerSettings.model_validate(settings)
        except ValidationError as e:
            errors = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'settings'}: {x['msg']}" for x in e.errors())
            raise BackendError(f"the {name} backend's settings are wrong: {errors}") from None
        self.name, self.server_id, self.home = name, server_id, Path(home)
        self.max_runners = self.settings.max_runners
        self.host = self.settings.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self._offers: list[Offer] | None = None
        self._offers_tried = float("-inf")
        self._lock = threading.Lock()
        self._offers_lock = threading.Lock()
        # a spare: a runner container started ahead of need (`dstack-runner spare`, waiting for its order), which
        # becomes the next runner at once (no container start, no Python start on the job's path); not with
        # docker_jobs (job containers name their runner's container, fixed at its creation)
        self.spares = not self.settings.docker_jobs and os.environ.get("DSTACK_DOCKER_SPARE", "1") != "0"
        self._spare = None
        self._spare_lock = threading.Lock()
        self._closed = False

    @cached_property
    def client(self):
        import docker

        try:
            if self.settings.docker_host:
                return docker.DockerClient(base_url=self.settings.docker_host, version="auto")
            return docker.from_env()
        except docker.errors.DockerException as e:
            raise BackendError(self._trouble(e)) from None

    @property
    def local(self) -> bool:
        """The engine is this machine's (its GPUs are the ones this process sees)."""
        return bool(re.match(r"(unix://|npipe://|tcp://(localhost|127\.0\.0\.1|\[::1\])[:/])", self.host + "/"))

    def _trouble(self, e: Exception) -> str:
        return str(e) if isinstance(e, BackendError) else f"cannot reach the Docker Engine at {self.host}: {_reason(e)}"

    def test(self) -> str:
        try:
            version = self.client.version()
            info = self.client.info()
            image = runner_image.find(self.client)
        except Exception as e:  # the SDK lets connection failures through as requests' errors
            raise BackendError(self._trouble(e)) from None
        if self.settings.cpus and self.settings.cpus > int(info.get("NCPU") or 0):
            raise BackendError(f"cpus: {self.settings.cpus:g} is more than the engine's machine has ({info.get('NCPU')})")
        size = self._resources(info).describe()
        built = (f"runner image {image} present" if image else
                 "no runner image yet: the first runner builds it (about 20 s)")
        return f"Docker Engine {version.get('Version')} (API {version.get('ApiVersion')}) at {self.host}, {size}; {built}"

    def offers(self) -> list[Offer]:
        """One kind of runner: the settings' size (or the whole machine), at no price; read from the engine once.
        Callers at once (submissions check offers in threads) wait for that read rather than find none."""
        if self._offers is None:
            with self._offers_lock:
                if self._offers is None and time.monotonic() - self._offers_tried > OFFER_RETRY:
                    try:
                        self._offers = [Offer(self.name, self._resources(self.client.info()),
                                              instance_type="container")]
                    except Exception as e:
                        log.warning("the %s backend: %s", self.name, self._trouble(e))
                    self._offers_tried = time.monotonic()
        return list(self._offers or []) if self.max_runners > 0 else []

    def _resources(self, info: dict) -> RunnerResources:
        cpus = self.settings.cpus or float(info.get("NCPU") or 1)
        memory = parse_size_mib(self.settings.memory) if self.settings.memory else int(info.get("MemTotal", 0)) >> 20
        gpus = []
        if self.local:
            from dstack.runner.resources import detect_gpus

            gpus = detect_gpus()
        # what the runner inside will say it has: a CPU quota counts as CPUs rounded up (runner/resources.py)
        return RunnerResources(cpus=max(1, math.ceil(cpus)), memory_mib=memory, gpus=gpus,
                               docker=self.settings.docker_jobs)

    def create(self, offer: Offer, bootstrap: Bootstrap) -> Instance:
        import docker.errors

        from dstack.runner.executors.orphans import RUNNER_CONTAINER_ENV

        server_id = bootstrap.server_id or self.server_id
        name = _container_name(bootstrap.runner_name)
        labels = {"dstack.server": server_id, "dstack.runner": bootstrap.runner_name, "dstack.backend": self.name}
        workdir, volumes, mountpoint = WORKDIR, {}, ""
        if self.settings.docker_jobs:
            mountpoint = self._volume(name, labels)
            workdir = f"{mountpoint}/runner"
            volumes = {"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                       name: {"bind": mountpoint, "mode": "rw"}}
        command = ["start", "--server", bootstrap.server_url, "--name", bootstrap.runner_name, "--backend", self.name,
                   "--workdir", workdir, "--idle-timeout", str(bootstrap.idle_timeout), "--token-file", TOKEN_FILE,
                   *(["--jobs-dir", f"{mountpoint}/jobs"] if self.settings.docker_jobs else ["--no-docker"]),
                   *(x for k, v in bootstrap.labels.items() for x in ("--labels", f"{k}={v}"))]
        spare = self._take_spare()
        if spare is not None:
            try:  # the token and the order, then its runner's name: it starts at once
                spare.put_archive("/run", _token_tar(bootstrap.token, order=command[1:]))
                spare.rename(name)
                self._spare_later()
                return Instance(id=spare.id, runner_name=bootstrap.runner_name, started_at=time.monotonic(),
                                offer=offer)
            except Exception as e:
                log.warning("the %s backend's spare container failed (%s): starting a new one", self.name, _reason(e))
                try:
                    spare.remove(force=True)
                except docker.errors.DockerException:
                    pass
        self._spare_later()
        with self._lock:
            image = self._image()
        self._remove_exited()
        sized = self._sized(offer)
        sized["environment"][RUNNER_CONTAINER_ENV] = name  # its job containers' label (executors/orphans)
        try:
            container = self.client.containers.create(image, command, name=name, labels=labels, volumes=volumes,
                                                      **sized)
        except Exception as e:
            self._remove_volume(name)
            raise BackendError(f"cannot create the container of runner {bootstrap.runner_name}: {_reason(e)}") from None
        try:
            # the token, before the runner starts: a file only root may read, which the runner removes once read
            container.put_archive("/run", _token_tar(bootstrap.token))
            container.start()
        except Exception as e:
            try:
                container.remove(force=True)
            except docker.errors.DockerException:
                pass
            self._remove_volume(name)
            raise BackendError(f"cannot start the container of runner {bootstrap.runner_name}: {_reason(e)}") from None
        return Instance(id=container.id, runner_name=bootstrap.runner_name, started_at=time.monotonic(), offer=offer)

    def _sized(self, offer: Offer) -> dict[str, Any]:
        """A runner container's options, spare or not: host networking, the offer's CPUs, memory and GPUs."""
        from docker.types import DeviceRequest

        cpus = self.settings.cpus or offer.resources.cpus
        memory = (parse_size_mib(self.settings.memory) if self.settings.memory else offer.resources.memory_mib) << 20
        gpus = [DeviceRequest(device_ids=[str(i) for i in range(len(offer.resources.gpus))], capabilities=[["gpu"]])]
        env = {k: os.environ[k] for k in ("DSTACK_STOP_GRACE", "DSTACK_JOB_UIDS") if k in os.environ}
        return {"network_mode": "host", "init": True, "environment": env, "nano_cpus": int(cpus * 1e9),
                "mem_limit": memory, "memswap_limit": memory,
                "device_requests": gpus if offer.resources.gpus else None}

    def _take_spare(self):
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:
            spare.reload()
        except Exception:
            return None
        return spare if spare.status == "running" else None

    def _spare_later(self, delay: float = SPARE_DELAY) -> None:
        if not self.spares or self._closed:
            return
        timer = threading.Timer(delay, self._make_spare)
        timer.daemon = True
        timer.start()

    def _make_spare(self) -> None:
        """Start a spare container (with the offer's limits), unless one runs; those of this server left by a
        server before this one go."""
        with self._spare_lock:
            if self._closed or self._spare is not None:
                return
            try:
                with self._lock:
                    image = self._image()
                self._remove_exited()  # housekeeping here, off a job's path
                for c in self._ours("containers"):
                    if any(n.lstrip("/").startswith(SPARE_PREFIX) for n in c.get("Names") or []):
                        self.client.api.remove_container(c["Id"], v=True, force=True)
                container = self.client.containers.create(
                    image, ["spare", "--order-file", ORDER_FILE], name=SPARE_PREFIX + secrets.token_hex(4),
                    labels={"dstack.server": self.server_id, "dstack.runner": "", "dstack.backend": self.name},
                    **self._sized(self.offers()[0]))
                container.start()
                self._spare = container
            except Exception as e:  # no spare: the next runner is started the ordinary way
                log.warning("the %s backend could not start a spare container: %s", self.name, _reason(e))

    def prepare(self) -> None:
        """The server keeps this backend: a spare container, soon."""
        self._spare_later(1.0)

    def close(self) -> None:
        """The server stops: its spare container goes (its runners go their own way)."""
        with self._spare_lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            try:
                spare.remove(force=True)
            except Exception as e:
                log.warning("the %s backend could not remove its spare container: %s", self.name, _reason(e))

    def _image(self) -> str:
        from dstack.backends import wheelhouse

        try:
            folder = wheelhouse.ensure(self.home / "server" / "wheels")  # the server's own (routers/wheels.py)
        except wheelhouse.WheelhouseError as e:
            raise BackendError(f"cannot make the runner image's wheels: {e}") from None
        try:
            return runner_image.ensure(self.client, folder)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"cannot build the runner image on the Docker Engine at {self.host}: {_reason(e)}") \
                from None

    def _volume(self, name: str, labels: dict[str, str]) -> str:
        """A volume for the runner's folders: its path on the engine's machine."""
        try:
            return self.client.volumes.create(name, labels=labels).attrs["Mountpoint"]
        except Exception as e:
            raise BackendError(f"cannot create the volume of runner {labels['dstack.runner']}: {_reason(e)}") from None

    def _remove_volume(self, name: str) -> None:
        if self.settings.docker_jobs:
            try:
                self.client.volumes.get(name).remove(force=True)
            except Exception:  # none, or the engine is away: the next sweep or terminate tries again
                pass

    def terminate(self, instance_id: str) -> bool:
        """SIGTERM (the runner stops its job and reports it), SIGKILL after the runner's stop wait, then removed
        with its volume and the job containers that it left (docker_jobs)."""
        import docker.errors

        try:
            container = self.client.containers.get(instance_id)
            container.stop(timeout=math.ceil(runner_stop_wait()))
            self._remove_jobs_of(container.name)
            container.remove(v=True, force=True)
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError as e:
            if e.status_code == 409 and "already in progress" in str(e.explanation):
                return True
            log.warning("the %s backend could not remove container %s: %s", self.name, instance_id[:12], _reason(e))
            return False
        except Exception as e:  # the engine is away: ask again later
            log.warning("the %s backend could not reach the Docker Engine: %s", self.name, _reason(e))
            return False
        self._remove_volume(container.name)
        return True

    def _remove_jobs_of(self, container_name: str) -> None:
        """The job (and warm) containers that a runner killed in its container left (executors/docker labels them
        with the runner's container)."""
        if not self.settings.docker_jobs:
            return
        for c in self.client.api.containers(all=True, filters={"label": f"dstack.runner_container={container_name}"}):
            self.client.api.remove_container(c["Id"], v=True, force=True)

    def list(self) -> list[Instance]:
        now_wall, now = time.time(), time.monotonic()
        try:
            found = self._ours("containers")
        except Exception as e:  # not "none": the autoscaler would start more
            raise BackendError(self._trouble(e)) from None
        return [Instance(id=c["Id"], runner_name=_runner_of(c),
                         started_at=now - max(0.0, now_wall - float(c.get("Created") or now_wall)))
                for c in found if c.get("State") not in DEAD and not _is_spare(c)]

    def _ours(self, kind: str, *labels: str) -> list[dict]:
        """This server's containers (all, exited too) or volumes of this backend, with these labels too."""
        filters = {"label": [f"dstack.server={self.server_id}", f"dstack.backend={self.name}", *labels]}
        if kind == "volumes":
            return self.client.api.volumes(filters=filters).get("Volumes") or []
        return self.client.api.containers(all=True, filters=filters)

    def _remove_exited(self) -> None:
        """The containers of runners that ended more than KEEP_EXITED ago, and volumes whose container is gone."""
        try:
            containers = self._ours("containers")
            for c in containers:
                if c.get("State") not in ("exited", "dead"):
                    continue
                state = self.client.api.inspect_container(c["Id"])["State"]
                if time.time() - _timestamp(state.get("FinishedAt")) > KEEP_EXITED:
                    self.client.api.remove_container(c["Id"], v=True, force=True)
                    self._remove_volume(_container_name(c["Labels"].get("dstack.runner", "")))
            if self.settings.docker_jobs:
                runners = {c["Labels"].get("dstack.runner") for c in containers}
                for volume in self._ours("volumes"):
                    if (volume.get("Labels") or {}).get("dstack.runner") not in runners:
                        self._remove_volume(volume["Name"])
        except Exception as e:
            log.warning("the %s backend could not remove exited runners' containers: %s", self.name, _reason(e))

    def describe_failure(self, runner_name: str) -> str:
        try:
            found = [c for c in self._ours("containers") if _runner_of(c) == runner_name]
            if not found:
                return f"no container of runner {runner_name} is left on the Docker Engine at {self.host}"
            container = self.client.containers.get(found[0]["Id"])
            state = container.attrs["State"]
            lines = [x for x in container.logs(tail=50).decode(errors="replace").splitlines() if x.strip()]
        except Exception as e:
            return f"the Docker Engine at {self.host} did not say: {_reason(e)}"
        how = (f"exited {state.get('ExitCode')}" if state.get("Status") in DEAD else f"is {state.get('Status')}") \
            + (", out of memory" if state.get("OOMKilled") else "") + (f" ({state['Error']})" if state.get("Error") else "")
        where = f"`docker logs {container.name}`"
        return f"its container {how}; {where} ends: {lines[-1][:300]}" if lines else f"its container {how}; {where} " \
            "is empty"

    def release_jobs(self, job_ids: list[str]) -> None:
        """Jobs whose runner was lost: their containers (of jobs with an image) must not run on. By the job's
        label, at once: the runners' own orphan sweep (executors/docker.remove_orphans) runs only as a runner
        starts, and sees a lost runner's container as running while it hangs."""
        if not job_ids or not self.settings.docker_jobs:
            return
        for job_id in job_ids:
            try:
                for c in self.client.api.containers(all=True, filters={"label": f"dstack.job_id={job_id}"}):
                    self.client.api.remove_container(c["Id"], v=True, force=True)
            except Exception as e:
                log.warning("the %s backend could not remove the container of job %s: %s", self.name, job_id,
                            _reason(e))


def _runner_of(c: dict) -> str:
    """The runner a container is: its label, or (a spare that became one) its name."""
    label = (c.get("Labels") or {}).get("dstack.runner")
    if label:
        return label
    names = [n.lstrip("/") for n in c.get("Names") or []]
    return next((n.removeprefix("dstack-runner-") for n in names if not n.startswith(SPARE_PREFIX)), "")


def _is_spare(c: dict) -> bool:
    return any(n.lstrip("/").startswith(SPARE_PREFIX) for n in c.get("Names") or [])


def _container_name(runner_name: str) -> str:
    return "dstack-runner-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", runner_name)


def _token_tar(token: str, order: list[str] | None = None) -> bytes:
    """/run/dstack/runner.token (root's, 0600), and for a spare its order (`start`'s arguments), last: the spare
    reads the order once it is there, and the token with it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(os.path.basename(TOKEN_DIR))
        folder.type, folder.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(folder)
        files = [(TOKEN_FILE, token.encode())]
        if order is not None:
            files.append((ORDER_FILE, json.dumps({"argv": order}).encode()))
        for path, data in files:
            info = tarfile.TarInfo(path.removeprefix("/run/"))
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _timestamp(text: str | None) -> float:
    """Docker's `2024-05-01T10:00:00.123456789Z` as seconds since the epoch (0 when unknown)."""
    if not text or text.startswith("0001-"):
        return 0.0
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        return 0.0
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + zone).timestamp() + float(m.group(2) or 0)


def _reason(e: Exception) -> str:
    return str(getattr(e, "explanation", None) or e).strip()[:500]
