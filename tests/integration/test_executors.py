"""Executors against the real thing: bash on this machine, and the Docker Engine with the locally
built busybox image. The same behaviours are asked of both where they share them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import dstack
from dstack.core.models import JobSpec
from dstack.runner.executors import ExecutorError, Mount
from dstack.runner.executors.docker import DockerExecutor
from dstack.runner.executors.host import HostExecutor

SRC = str(Path(dstack.__file__).resolve().parents[1])


class Output:
    """Collects what on_output receives, from the executor's thread."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self._cond:
            self.chunks.append(chunk)
            self._cond.notify_all()

    @property
    def data(self) -> bytes:
        with self._cond:
            return b"".join(self.chunks)

    def wait_for(self, needle: bytes, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: needle in b"".join(self.chunks), timeout)


class Harness:
    """Starts jobs with one executor in a fresh root folder, and stops what is left at the end."""

    def __init__(self, kind: str, root: Path, image: str | None, client=None) -> None:
        self.kind = kind  # host, docker (a container created for each job), docker-warm (started before it)
        self.root = root
        self.image = image
        self.executor = HostExecutor() if kind == "host" else DockerExecutor(client)
        self.started = []

    def start(
        self, commands: list[str], mounts: list[Mount] | None = None, extra_env: dict | None = None, **spec
    ):
        job = JobSpec(
            job_id=uuid.uuid4().hex[:12],
            run_name="test-run-1",
            workflow="test",
            provider="bash" if self.kind == "host" else "docker",
            image=self.image,
            commands=commands,
            **spec,
        )
        output = Output()
        if self.kind == "docker-warm":
            assert self.executor.warm(job, self.root)
            assert self.executor.claim(job) == self.root.resolve()
        execution = self.executor.start(job, self.root, mounts or [], extra_env or {}, output)
        self.started.append(execution)
        if self.kind.startswith("docker"):
            assert execution.warm == (self.kind == "docker-warm")
        return execution, output

    def run(self, commands: list[str], **kwargs) -> tuple[int, bytes]:
        execution, output = self.start(commands, **kwargs)
        return execution.wait(), output.data

    def cleanup(self) -> None:
        for execution in self.started:
            execution.stop(grace=0)
            execution.wait()
            execution.dispose()
        self.executor.close()


@pytest.fixture(params=["host", "docker", "docker-warm"])
def harness(request, tmp_path):
    if request.param.startswith("docker"):
        image = request.getfixturevalue("busybox_image")
        h = Harness(request.param, tmp_path, image, request.getfixturevalue("docker_client"))
    else:
        h = Harness("host", tmp_path, None)
    yield h
    h.cleanup()


@pytest.fixture
def docker(request, tmp_path):
    h = Harness(
        "docker", tmp_path, request.getfixturevalue("busybox_image"), request.getfixturevalue("docker_client")
    )
    yield h
    h.cleanup()


def _gone(pid: int) -> bool:
    """Dead, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- both executors ---------------------------------------------------------------------------


def test_exit_code_is_the_jobs(harness):
    assert harness.run(["true"])[0] == 0
    assert harness.run(["echo before", "exit 3"]) == (3, b"before\r\n")


def test_commands_stop_at_the_first_failing_one(harness):
    code, out = harness.run(["echo one", "false", "echo never"])
    assert code == 1
    assert b"one" in out and b"never" not in out


def test_commands_run_in_the_working_dir(harness):
    (harness.root / "sub").mkdir()
    (harness.root / "sub" / "here.txt").write_text("inside sub\n")
    code, out = harness.run(["pwd", "cat here.txt"], working_dir="sub")
    assert code == 0
    lines = out.split(b"\r\n")
    assert lines[0].endswith(b"/sub")
    assert lines[1] == b"inside sub"


def test_output_streams_as_written_including_carriage_returns(harness):
    # a progress bar: no newline, only \r; it must arrive before the job goes on
    execution, output = harness.start(
        [
            "printf 'a\\rb\\n'",
            "printf 'step 1\\r'",
            "while [ ! -f go ]; do sleep 0.05; done",
            "printf 'step 2\\n'",
        ]
    )
    assert output.wait_for(b"step 1\r"), output.data
    (harness.root / "go").touch()
    assert execution.wait() == 0
    assert output.data == b"a\rb\r\nstep 1\rstep 2\r\n"


def test_env_and_picked_ports_reach_the_job(harness):
    execution, output = harness.start(
        ['echo "$FOO|$FROM_SPEC|$PORT_0|$JOB_PORT_0|$PORT_1|$RUN_NAME"'],
        extra_env={"FOO": "bar baz"},
        env={"FROM_SPEC": "1", "FOO": "overridden by the runner's env"},
        ports=2,
    )
    assert execution.wait() == 0
    foo, from_spec, port0, job_port0, port1, run_name = output.data.strip().decode().split("|")
    assert (foo, from_spec, run_name) == ("bar baz", "1", "test-run-1")
    assert [int(port0), int(port1)] == execution.ports
    assert port0 == job_port0 and port0 != port1


def test_stop_ends_a_sleeping_job_with_sigterm(harness):
    execution, output = harness.start(["echo ready", "sleep 1000"])
    assert output.wait_for(b"ready")
    codes = []  # as in the runner: one thread waits, another stops
    waiter = threading.Thread(target=lambda: codes.append(execution.wait()))
    waiter.start()
    started = time.monotonic()
    execution.stop(grace=10)
    assert time.monotonic() - started < 3
    waiter.join(5)
    assert codes == [128 + signal.SIGTERM]
    assert execution.wait() == 128 + signal.SIGTERM
    execution.stop(grace=10)  # again, after the end: nothing happens


def test_stop_kills_a_job_that_ignores_sigterm_after_the_grace(harness):
    execution, output = harness.start(["trap '' TERM", "echo ready", "sleep 1000"])
    assert output.wait_for(b"ready")
    started = time.monotonic()
    execution.stop(grace=1)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 5
    assert execution.wait() == 128 + signal.SIGKILL


def test_background_processes_end_with_the_job(harness):
    started = time.monotonic()
    code, _ = harness.run(["sleep 1000 &", "echo $! > bg.pid"])
    assert code == 0
    assert time.monotonic() - started < 5  # wait() is not held up by the leftover's terminal
    if harness.kind == "host":  # in a container the pid is another namespace's
        assert _wait_until(lambda: _gone(int((harness.root / "bg.pid").read_text())), 5)


# --- host executor ----------------------------------------------------------------------------

RUNNER_SCRIPT = """
import sys, time
from pathlib import Path
from dstack.core.models import JobSpec
from dstack.runner.executors.host import HostExecutor

job = JobSpec(workflow="w", provider="bash",
              commands=["sleep 1000 & echo $! > child.pid", "echo $$ > shell.pid", "wait"])
HostExecutor().start(job, Path(sys.argv[1]), [], {}, lambda chunk: None)
print("started", flush=True)
time.sleep(1000)
"""


def test_job_dies_with_a_sigkilled_runner(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER_SCRIPT, str(tmp_path)], env=env, stdout=subprocess.PIPE
    )
    try:
        assert runner.stdout.readline() == b"started\n"
        pid_files = [tmp_path / "shell.pid", tmp_path / "child.pid"]
        assert _wait_until(lambda: all(p.exists() and p.read_text().endswith("\n") for p in pid_files), 5)
        shell, child = (int(p.read_text()) for p in pid_files)
        assert not _gone(shell) and not _gone(child)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    assert _wait_until(lambda: _gone(shell), 5), "the job's shell outlived the runner"
    assert _wait_until(lambda: _gone(child), 5), "a process the job started outlived the runner"


def test_host_job_does_not_see_the_runners_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DSTACK_SECRET_OF_THE_RUNNER", "x")
    execution, output = Harness("host", tmp_path, None).start(
        ['echo "[$DSTACK_SECRET_OF_THE_RUNNER]" "$PATH"']
    )
    assert execution.wait() == 0
    assert output.data.startswith(b"[] ") and b"/bin" in output.data


# --- docker executor --------------------------------------------------------------------------


def test_dependency_mount_is_read_only_inside_the_job(docker, tmp_path_factory):
    dep = tmp_path_factory.mktemp("dep")
    (dep / "a.txt").write_text("from prepare\n")
    code, out = docker.run(["cat data/a.txt", "echo changed > data/a.txt"], mounts=[Mount(dep, "data")])
    assert code != 0
    assert b"from prepare" in out and b"Read-only file system" in out
    assert (dep / "a.txt").read_text() == "from prepare\n"


def test_writable_mount_and_root_files_appear_on_the_host(docker, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    code, _ = docker.run(
        ["mkdir -p out", "echo hi > out/x", "echo cached > cache/y"],
        mounts=[Mount(cache, "cache", read_only=False)],
    )
    assert code == 0
    assert (docker.root / "out" / "x").read_text() == "hi\n"
    assert (cache / "y").read_text() == "cached\n"


def test_container_uses_host_networking_and_is_removed_once_disposed(docker, docker_client):
    execution, output = docker.start(["echo ready", "sleep 1000"], requirements={"shm_size": "128MB"})
    assert output.wait_for(b"ready")
    container = docker_client.containers.get(execution.container.id)
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert container.attrs["HostConfig"]["ShmSize"] == 128 * 1024 * 1024
    assert container.labels["dstack.run_name"] == "test-run-1"
    assert container.name == f"dstack-{container.labels['dstack.job_id']}"
    assert execution.image_digest == docker_client.images.get(docker.image).id
    execution.stop(grace=1)
    execution.wait()
    assert docker_client.containers.list(all=True, filters={"id": container.id})  # kept until disposed
    execution.dispose()
    deadline = time.monotonic() + 10  # removed in the background
    while docker_client.containers.list(all=True, filters={"id": container.id}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not docker_client.containers.list(all=True, filters={"id": container.id})


def test_missing_image_is_an_executor_error_saying_so(docker):
    docker.image = "dstack-test/no-such-image:latest"
    with pytest.raises(
        ExecutorError, match="dstack-test/no-such-image:latest not found locally and could not be pulled"
    ):
        docker.start(["true"])


def test_unreachable_docker_is_an_executor_error(tmp_path):
    import docker as docker_sdk

    client = docker_sdk.DockerClient(base_url=f"unix://{tmp_path}/no.sock", version="1.41", timeout=2)
    job = JobSpec(workflow="w", provider="docker", image="dstack-test/busybox:latest", commands=["true"])
    with pytest.raises(ExecutorError, match="Docker is not reachable"):
        DockerExecutor(client).start(job, tmp_path, [], {}, lambda chunk: None)


def test_close_finishes_removing_the_containers_of_ended_jobs(docker, docker_client):
    """A runner that exits right after its last report must not leave that job's container behind."""
    execution, _ = docker.start(["true"])
    assert execution.wait() == 0
    execution.dispose()
    docker.executor.close()
    assert not docker_client.containers.list(all=True, filters={"id": execution.container.id})


def test_the_orphan_sweep_judges_a_runner_by_its_pid_only_in_its_own_pid_namespace(docker, docker_client):
    """A runner in a container (its own pid namespace: the `docker` backend's) cannot see the pids of runners
    outside it: its sweep leaves their live job containers alone, and removes those of a runner whose container
    is gone; a sweep in the host's namespace leaves the containers of such runners to them."""
    import json

    from dstack.core.processes import start_time
    from dstack.runner.executors.orphans import _boot_id, _pid_ns, _runner_labels, remove_orphans

    execution, output = docker.start(["echo ready", "sleep 1000"])  # this process's job: a live runner's
    assert output.wait_for(b"ready")
    live = docker_client.containers.get(execution.container.id)
    assert live.labels["dstack.pid_ns"] == _pid_ns() and "dstack.runner_container" not in live.labels
    tag = uuid.uuid4().hex[:8]
    made = []

    def container(name: str, **labels: str):
        made.append(docker_client.containers.create(docker.image, ["sleep", "1000"], name=f"dstack-test-{name}-{tag}",
                                                    labels={"dstack.job_id": f"{name}-{tag}", **labels},
                                                    network_mode="host"))
        return made[-1]

    try:
        holder = container("holder")  # the container of a runner in a namespace of its own
        holder.start()
        boxed = {"dstack.runner_pid": "7", "dstack.runner_started": "1", "dstack.boot_id": _boot_id(),
                 "dstack.pid_ns": "4026599999"}
        container("boxed-live", **boxed, **{"dstack.runner_container": holder.name})
        container("boxed-gone", **boxed, **{"dstack.runner_container": f"dstack-test-no-such-runner-{tag}"})
        container("boxed-unnamed", **boxed)
        dead = subprocess.Popen(["sleep", "60"])
        born = start_time(dead.pid)
        dead.kill()
        dead.wait()
        container("dead", **{**_runner_labels(), "dstack.runner_pid": str(dead.pid), "dstack.runner_started": str(born)})

        # a runner in a pid namespace of its own sweeps
        code = ("import json, sys\nfrom dstack.runner.executors.orphans import _pid_ns, _runner_alive, remove_orphans\n"
                "print(json.dumps({'ns': _pid_ns(), 'alive': _runner_alive(json.loads(sys.argv[1])), "
                "'removed': remove_orphans()}))")
        p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code,
                            json.dumps(live.labels)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": SRC})
        assert p.returncode == 0, p.stderr
        inside = json.loads(p.stdout)
        assert inside["ns"] != _pid_ns()
        assert inside["alive"] is False  # by pid, this process is dead from there: what the sweep judged by before
        mine = {j for j in inside["removed"] if j.endswith(tag) or j == live.labels["dstack.job_id"]}
        assert mine == {f"boxed-gone-{tag}"}
        live.reload()
        assert live.status == "running"

        # a runner in the host's namespace sweeps: the dead runner's goes, the boxed runners' are theirs
        removed = set(remove_orphans())
        assert f"dead-{tag}" in removed and live.labels["dstack.job_id"] not in removed
        assert not {f"boxed-live-{tag}", f"boxed-unnamed-{tag}"} & removed
        holder.remove(force=True)  # the boxed runner's container is gone: its job's container is an orphan now
        p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code, "{}"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})
        assert p.returncode == 0, p.stderr
        assert {j for j in json.loads(p.stdout)["removed"] if j.endswith(tag)} == {f"boxed-live-{tag}"}
        names = {c.name for c in docker_client.containers.list(all=True, filters={"name": tag})}
        assert names == {f"dstack-test-boxed-unnamed-{tag}"}
    finally:
        for c in made:
            try:
                c.remove(force=True)
            except Exception:  # removed by the sweep, as it should be
                pass
