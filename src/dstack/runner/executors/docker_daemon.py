"""The Docker daemon as the Docker executor sees it: its errors, whether it is there, and the containers it
could not remove while it was away.

A daemon told to stop (SIGTERM: `systemctl restart docker`, an upgrade) first closes its socket, then stops
the containers (unless it runs with `--live-restore`), then exits; the connections it already has are
served until then. So a job's `wait` returns the exit code of a container the daemon killed (143) as if the
job had failed by itself: only a *new* connection, refused, tells the two apart. A daemon that dies
(SIGKILL, crash) breaks the job's `wait`; the containers stay up until it is back, and it kills them then.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import docker.errors
import requests

log = logging.getLogger(__name__)

# the SDK lets connection failures through as requests' exceptions
DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)
PROBE_TIMEOUT = 2.0  # seconds for the daemon to accept a new connection
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds between tries of a removal that failed, doubling


def accepts_connections(client: Any) -> bool:
    """Whether the daemon of `client` (a DockerClient) accepts a new connection. One that is stopping does
    not, although it still answers on the connections it has (the client's pooled ones too)."""
    api = client.api
    path = getattr(api.get_adapter(api.base_url), "socket_path", None)
    try:
        if path is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(PROBE_TIMEOUT)
                s.connect(path)
            return True
        if api.base_url.startswith(("http://", "https://")):
            requests.get(f"{api.base_url}/_ping", timeout=PROBE_TIMEOUT, cert=api.cert, verify=api.verify)
        return True  # an ssh or npipe transport: cannot tell, so it is not said to be away
    except (OSError, requests.exceptions.RequestException):
        return False


def wait_until_back(container: Any, timeout: float, give_up: threading.Event) -> bool:
    """Wait for the daemon that `container` (a Container) lives in to answer again, and reload the container
    from it. False after `timeout` seconds, or as soon as `give_up` is set."""
    deadline = time.monotonic() + timeout
    while True:
        if accepts_connections(container.client):
            try:
                container.reload()
                return True
            except requests.exceptions.RequestException:
                pass  # it accepted the connection and went away again, or is still starting up
        if give_up.wait(min(0.5, max(0.0, deadline - time.monotonic()))) or time.monotonic() >= deadline:
            return False


class Removals:
    """Containers to remove, tried at once and then again, less and less often, while Docker cannot remove
    them (its daemon is away or restarting): a container that outlived the daemon's restart does not stay."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: dict[str, Any] = {}  # containers by id
        self._hurry = False  # try the pending ones now, not after the back-off
        self._worker: threading.Thread | None = None
        self._closed = False

    def remove(self, container: Any, wait: bool = True) -> None:
        """Remove `container`: now when `wait`, else in the background; then again later until Docker can."""
        if (wait or self._closed) and _remove(container):
            return
        with self._lock:
            self._pending[container.id] = container
            self._hurry = self._hurry or not wait
            if self._worker is None and not self._closed:
                self._worker = threading.Thread(target=self._work, name="dstack-docker-removals", daemon=True)
                self._worker.start()
            self._changed.notify_all()

    def retry_now(self) -> None:
        """Docker answered again: the removals that failed are tried at once."""
        with self._lock:
            if self._pending:
                self._hurry = True
                self._changed.notify_all()

    def close(self, timeout: float) -> list[str]:
        """Try what is pending once more (for at most `timeout` seconds) and stop; the ids of the containers
        still left, which the next runner on this machine removes (`remove_orphans`)."""
        with self._lock:
            self._closed = self._hurry = True
            self._changed.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)
        with self._lock:
            left = list(self._pending)
        for container_id in left:
            log.warning("could not remove container %s: Docker is unreachable; the next runner on this machine "
                        "removes it", container_id[:12])
        return left

    def _work(self) -> None:
        delay = RETRY_FIRST
        while True:
            with self._lock:
                if not self._hurry:
                    self._changed.wait_for(lambda: self._hurry, timeout=delay)
                if self._hurry:
                    delay, self._hurry = RETRY_FIRST, False
                else:
                    delay = min(2 * delay, RETRY_MAX)
                due = list(self._pending.values())
            done = [c.id for c in due if _remove(c)]
            with self._lock:
                for container_id in done:
                    self._pending.pop(container_id, None)
                if not self._pending or (self._closed and not self._hurry):
                    self._worker = None
                    return


def _remove(container: Any) -> bool:
    """Whether `container` is gone or going (another removal of it is in progress)."""
    try:
        container.remove(force=True)
        return True
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError as e:
        if e.status_code == 409:  # its removal is in progress
            return True
        log.warning("could not remove container %s: %s; tried again later", container.short_id, e)
        return False
    except DOCKER_ERRORS as e:
        log.info("could not remove container %s (%s): tried again once Docker answers", container.short_id, e)
        return False
