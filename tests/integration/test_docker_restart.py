"""A restart of the Docker daemon, survived: a job it killed fails saying so, a container it could not
remove while it was away goes once it is back, and a warm-up it broke is tried again. Each test stops,
kills or restarts a Docker daemon of its own (private_dockerd.py), never the shared one."""

from __future__ import annotations

import io
import os
import shutil
import signal
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.conftest import BUSYBOX_IMAGE, _build_context
from tests.integration.private_dockerd import PrivateDockerd

from dstack.core.models import JobSpec
from dstack.runner.executors import ExecutorError
from dstack.runner.executors.docker import DockerExecutor

# an image whose /bin/sh takes 2 s to start the first time in a container: a warm container is still getting
# ready when dockerd stops (the second shell, which reads the job's lines, starts at once)
SLOW_SHELL_IMAGE = "dstack-test/slow-shell:latest"
_SLOW_SH = b"""#!/bin/busybox sh
[ -e /.started ] || { : >/.started; sleep 2; }
exec /bin/busybox sh "$@"
"""
_SLOW_SHELL = (b"FROM " + BUSYBOX_IMAGE.encode() + b'\nRUN ["/bin/busybox", "rm", "/bin/sh"]\n'  # a link to busybox
               b"COPY sh /bin/sh\n")


@pytest.fixture(scope="module")
def dockerd():
    """A dockerd of this module's own, with the busybox test image; stopped and removed at the end, also
    when a test failed while it was stopped or killed."""
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.fail("these tests start a Docker daemon of their own: run them as root where dockerd is "
                    "installed (scripts/test.sh installs it)", pytrace=False)
    daemon = PrivateDockerd(Path(tempfile.mkdtemp(prefix="dstack-dockerd-", dir="/tmp")))
    try:
        daemon.start()
        client = daemon.client()
        try:
            client.images.build(fileobj=_build_context(), custom_context=True, tag=BUSYBOX_IMAGE, pull=False,
                                rm=True)
            slow = io.BytesIO()
            with tarfile.open(fileobj=slow, mode="w") as tar:
                for name, data in (("Dockerfile", _SLOW_SHELL), ("sh", _SLOW_SH)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o755
                    tar.addfile(info, io.BytesIO(data))
            slow.seek(0)
            client.images.build(fileobj=slow, custom_context=True, tag=SLOW_SHELL_IMAGE, pull=False, rm=True)
        finally:
            client.close()
        yield daemon
    finally:
        daemon.destroy()


@pytest.fixture
def private(dockerd, monkeypatch):
    """The private dockerd, running as started by the module (a test before may have left it stopped, or
    started it with other flags), as DOCKER_HOST."""
    if dockerd.running and dockerd.started_with:
        dockerd.stop()
    if not dockerd.running:
        dockerd.start()
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    yield dockerd
    if not dockerd.running:
        dockerd.start()
    client = dockerd.client()
    try:
        for c in client.containers.list(all=True):
            c.remove(force=True)
    finally:
        client.close()


@pytest.fixture
def executor(private):
    ex = DockerExecutor()  # docker.from_env(): DOCKER_HOST
    yield ex
    ex.close()


def _job(commands: list[str], image: str = BUSYBOX_IMAGE) -> JobSpec:
    return JobSpec(job_id=uuid.uuid4().hex[:12], run_name="restart-run-1", workflow="w", provider="docker",
                   image=image, commands=commands)


def _started(executor: DockerExecutor, job: JobSpec, root: Path, said: bytes = b"started"):
    out: list[bytes] = []
    execution = executor.start(job, root, [], {}, out.append)
    deadline = time.monotonic() + 10
    while said not in b"".join(out):
        assert time.monotonic() < deadline, f"the job did not say {said!r}: {b''.join(out)!r}"
        time.sleep(0.02)
    return execution, out


def _waiting(execution) -> Future:
    """`execution.wait()`, called in the background as the runner calls it: before the daemon goes away."""
    pool = ThreadPoolExecutor(1)
    waited = pool.submit(execution.wait)
    pool.shutdown(wait=False)
    time.sleep(0.5)  # its request is on its way
    assert not waited.done()
    return waited


def _containers(daemon: PrivateDockerd) -> list[str]:
    client = daemon.client()
    try:
        # sparse: the names as listed, without inspecting each (one removed meanwhile is no error)
        return [c.attrs["Names"][0].lstrip("/") for c in client.containers.list(all=True, sparse=True)]
    finally:
        client.close()


def test_a_job_killed_by_the_docker_daemon_as_it_stops_fails_saying_so(private, executor, tmp_path):
    execution, _ = _started(executor, _job(["echo started", "sleep 60"]), tmp_path / "code")
    waited = _waiting(execution)
    private.stop(signal.SIGTERM)  # it stops its containers (no --live-restore), then exits
    assert waited.result(timeout=10) == 143
    assert getattr(execution, "failure_reason", None) == "the Docker daemon stopped while the job ran (exit code 143)"


def test_a_job_whose_docker_daemon_died_is_waited_for_and_fails_saying_so(private, executor, tmp_path):
    execution, _ = _started(executor, _job(["echo started", "sleep 60"]), tmp_path / "code")
    waited = _waiting(execution)
    private.stop(signal.SIGKILL)  # the container runs on, until the daemon is back and stops it
    time.sleep(1)
    assert not waited.done()
    private.start()
    assert waited.result(timeout=30) == 143
    assert getattr(execution, "failure_reason", None) == "the Docker daemon restarted while the job ran (exit code 143)"


def test_a_job_stopped_while_its_docker_daemon_is_dead_is_waited_for_no_more(private, executor, tmp_path):
    execution, _ = _started(executor, _job(["echo started", "sleep 60"]), tmp_path / "code")
    waited = _waiting(execution)
    private.stop(signal.SIGKILL)
    time.sleep(1)
    with pytest.raises(ExecutorError, match="Docker is unreachable"):
        execution.stop(grace=1)
    with pytest.raises(ExecutorError, match="the job was stopped before it was back"):
        waited.result(timeout=5)  # not after DAEMON_BACK_TIMEOUT


def test_a_job_outlives_a_restart_of_a_live_restore_daemon_with_its_output(private, executor, tmp_path):
    private.stop()
    private.start("--live-restore")
    job = _job(["echo started", "until [ -e /workflow/go ]; do sleep 0.05; done",
                "until [ -e /workflow/done ]; do echo after the restart; sleep 0.1; done", "exit 3"])
    execution, out = _started(executor, job, tmp_path / "code")
    waited = _waiting(execution)
    private.stop()  # the container runs on without it
    private.start("--live-restore")
    (tmp_path / "code" / "go").touch()
    deadline = time.monotonic() + 10
    while b"after the restart" not in b"".join(out):  # its output is read again
        assert time.monotonic() < deadline, f"no output after the restart: {b''.join(out)!r}"
        time.sleep(0.05)
    (tmp_path / "code" / "done").touch()
    assert waited.result(timeout=30) == 3
    assert b"".join(out).startswith(b"started\r\nafter the restart\r\n")
    assert getattr(execution, "failure_reason", None) is None  # it failed by itself


def test_a_container_docker_could_not_remove_while_its_daemon_was_down_is_removed_once_it_is_back(
        private, executor, tmp_path):
    job = _job(["echo started", "sleep 60"])
    execution, _ = _started(executor, job, tmp_path / "code")
    waited = _waiting(execution)
    private.stop()
    assert waited.result(timeout=10) == 143
    execution.dispose()  # fails: the daemon is down
    time.sleep(0.5)
    private.start()
    assert f"dstack-{job.job_id}" in _containers(private)  # killed by the daemon, not removed
    deadline = time.monotonic() + 20
    while f"dstack-{job.job_id}" in _containers(private):
        assert time.monotonic() < deadline, "the job's container outlived the daemon's restart"
        time.sleep(0.2)


def test_a_warm_up_broken_by_the_docker_daemon_stopping_is_tried_again(private, executor, tmp_path):
    job = _job(["echo warm"], image=SLOW_SHELL_IMAGE)
    warming = threading.Thread(target=executor.warm, args=(job, tmp_path / "a" / "code"))
    warming.start()
    deadline = time.monotonic() + 10
    client = private.client()
    try:
        while not client.containers.list(filters={"label": "dstack.warm", "status": "running"}):
            assert time.monotonic() < deadline, "no container was warmed up"
            time.sleep(0.05)
    finally:
        client.close()
    private.stop()  # while the container's shell starts (2 s)
    warming.join()
    private.start()
    deadline = time.monotonic() + 20
    while not executor.warm(job, tmp_path / "b" / "code"):  # after a short back-off
        assert time.monotonic() < deadline, "the image was never warmed up again"
        time.sleep(0.2)
    assert executor.claim(job) == (tmp_path / "b" / "code").resolve()
    out: list[bytes] = []
    execution = executor.start(job, tmp_path / "b" / "code", [], {}, out.append)
    assert (execution.warm, execution.wait(), b"".join(out)) == (True, 0, b"warm\r\n")
    execution.dispose()
