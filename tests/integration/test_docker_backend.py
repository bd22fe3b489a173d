"""The `docker` backend against the real Docker Engine (no mocks): its runner image built here from the host's own
Python (never pulled), runners as containers within their offer's limits that register with a real server on
loopback and run real jobs, found by their labels, terminated for good. Whatever the module makes on the engine
(containers, volumes, image tags that were not there before) is removed at its end, also after a failure."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest
from tests.dstack_server import Server

from dstack.backends import runner_image, wheelhouse
from dstack.backends.base import BackendError, Bootstrap, Offer
from dstack.backends.docker import DockerBackend
from dstack.core.resources import Gpu, RunnerResources
from dstack.runner.executors.orphans import _boot_id, _pid_ns, _runner_labels

SERVER_ID = f"test-docker-backend-{secrets.token_hex(4)}"
REPO = "transfers"  # Server.submit's
INSIDE = """\
workflows:
  - name: inside
    commands:
      - mkdir -p out
      - id -u > out/uid
      - "{ cat /sys/fs/cgroup/memory.max || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; } 2>/dev/null > out/memory"
      - "{ cat /sys/fs/cgroup/cpu.max || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; } 2>/dev/null > out/cpu"
      - env | grep -c TOKEN > out/tokens || true
      - echo made in a container
    artifacts: [out]
  - name: imaged
    image: dstack-test/busybox:latest
    commands:
      - mkdir -p out && echo from a sibling container > out/note
    artifacts: [out]
"""


@pytest.fixture(scope="module")
def engine(docker_client):
    """The engine, and the removal of all the module makes there, at its end (a failure included)."""
    before = {t for image in docker_client.images.list() for t in image.tags}
    yield docker_client
    ours = {"label": f"dstack.server={SERVER_ID}"}
    for c in docker_client.containers.list(all=True, filters=ours):
        c.remove(force=True, v=True)
    for v in docker_client.volumes.list(filters=ours):
        v.remove(force=True)
    made = {t for image in docker_client.images.list() for t in image.tags} - before
    # the runner images first: the base is the parent of theirs
    for tag in sorted(made, key=lambda t: not t.startswith(runner_image.RUNNER_REPO)):
        if tag.startswith((runner_image.RUNNER_REPO, runner_image.BASE_REPO)):
            docker_client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The backends' home (its wheelhouse under server/wheels), one for the module: the image is built once."""
    return tmp_path_factory.mktemp("docker-backend-home")


@pytest.fixture(scope="module")
def wheels(home) -> Path:
    return wheelhouse.ensure(home / "server" / "wheels")


@pytest.fixture(scope="module")
def image(engine, wheels) -> str:
    started = time.monotonic()
    tag = runner_image.ensure(engine, wheels)
    print(f"runner image {tag}: {time.monotonic() - started:.1f} s")
    return tag


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "server-home")
    yield server
    server.stop()


def test_the_runner_image_is_built_here_from_the_hosts_python_and_a_second_build_is_a_no_op(engine, wheels, image):
    built = engine.images.get(image)
    assert built.labels["dstack.version"] == runner_image.__version__
    assert built.labels["dstack.wheelhouse"] in image
    assert built.attrs["Config"]["Entrypoint"] == ["dstack-runner"]
    base = engine.images.get(built.labels["dstack.base"])
    assert base.tags[0].startswith(f"{runner_image.BASE_REPO}:3.11-")
    assert base.labels["dstack.base"] == base.tags[0]
    count = len(engine.images.list(all=True))
    started = time.monotonic()
    again = runner_image.ensure(engine, wheels)
    assert again == image and engine.images.get(again).id == built.id
    assert len(engine.images.list(all=True)) == count
    assert time.monotonic() - started < 3
    assert (runner_image.find(engine) or "").startswith(f"{runner_image.RUNNER_REPO}:{runner_image.__version__}-")


def test_a_runner_container_runs_a_host_job_within_its_limits_and_is_terminated(engine, home, image, server):
    backend = DockerBackend("docker", {"cpus": 1.5, "memory": "768MB"}, server_id=SERVER_ID, home=home)
    assert f"; runner image {runner_image.RUNNER_REPO}:" in backend.test()
    [offer] = backend.offers()
    assert (offer.price, offer.instance_type, offer.resources.cpus, offer.resources.memory_mib) == \
        (0.0, "container", 2, 768)
    token = server.check(server.admin.post("/api/runners/tokens", json={"name": "boxed"}))["token"]
    inst = backend.create(offer, Bootstrap(server_url=server.url, token=token, runner_name="boxed",
                                           idle_timeout=120, server_id=SERVER_ID))
    container = engine.containers.get(inst.id)
    host = container.attrs["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["MemorySwap"]) == (1_500_000_000, 768 << 20, 768 << 20)
    assert host["NetworkMode"] == "host" and not host.get("Binds")  # no Docker socket without docker_jobs
    assert {k: container.labels[k] for k in ("dstack.server", "dstack.runner", "dstack.backend")} == \
        {"dstack.server": SERVER_ID, "dstack.runner": "boxed", "dstack.backend": "docker"}
    assert "--token-file" in container.attrs["Args"] and "--no-docker" in container.attrs["Args"]
    for c in engine.containers.list(all=True):  # the token: in no container's environment or command line
        seen = json.dumps([c.attrs["Config"].get(k) for k in ("Env", "Cmd", "Entrypoint")] + [c.attrs.get("Args")])
        assert token not in seen, c.name

    runner = _registered(server, backend, "boxed")
    assert (runner["resources"]["cpus"], runner["resources"]["memory_mib"]) == (2, 768)  # its cgroup's, as offered
    assert runner["backend"] == "docker"
    assert container.exec_run(["test", "-e", "/run/dstack/runner.token"]).exit_code == 1  # read, then removed
    # a backend made afresh (a server restarted) finds it by its labels; another server's does not
    assert [(i.id, i.runner_name) for i in DockerBackend("docker", {}, server_id=SERVER_ID, home=home).list()] == \
        [(inst.id, "boxed")]
    assert DockerBackend("docker", {}, server_id=SERVER_ID + "-other", home=home).list() == []

    run = server.submit(INSIDE, "inside")
    info = _finished(server, run)
    assert info["status"] == "DONE", info
    files = _artifact_files(server, run)
    assert int(files["out/uid"]) >= 1000  # a uid of the job's own (runner/job_user.py), not root
    # the limits, as the job sees them (cgroup v2's memory.max and cpu.max, or v1's)
    assert files["out/memory"].strip() == str(768 << 20)
    assert files["out/cpu"].split()[0] == "150000"  # of a period of 100000: 1.5 CPUs
    assert files["out/tokens"].strip() == "0"

    assert backend.terminate(inst.id) is True
    assert backend.terminate(inst.id) is True  # gone is gone
    assert backend.list() == []
    assert not engine.containers.list(all=True, filters={"label": f"dstack.server={SERVER_ID}"})


def test_a_runner_that_cannot_start_says_why_and_a_failed_start_leaves_no_container(engine, home, image, server):
    backend = DockerBackend("docker", {"memory": "256MB"}, server_id=SERVER_ID, home=home)
    [offer] = backend.offers()
    inst = backend.create(offer, Bootstrap(server_url=server.url, token="not-a-token", runner_name="refused",
                                           idle_timeout=30, server_id=SERVER_ID))
    deadline = time.monotonic() + 30
    while any(i.id == inst.id for i in backend.list()):  # an exited container is no instance
        assert time.monotonic() < deadline, "the runner with a wrong token did not exit"
        time.sleep(0.2)
    why = backend.describe_failure("refused")
    assert why.startswith("its container exited ") and "`docker logs dstack-runner-refused` ends: " in why, why
    assert backend.terminate(inst.id) is True
    assert "no container of runner refused" in backend.describe_failure("refused")

    if "nvidia" not in engine.info().get("Runtimes", {}):
        # a GPU the engine cannot give: the start fails, and the container is removed
        gpus = Offer("docker", RunnerResources(cpus=1, memory_mib=256, gpus=[Gpu(name="H100")]))
        with pytest.raises(BackendError, match="cannot start the container of runner gpu-less"):
            backend.create(gpus, Bootstrap(server_url=server.url, token="t", runner_name="gpu-less",
                                           idle_timeout=30, server_id=SERVER_ID))
        assert not engine.containers.list(all=True, filters={"label": "dstack.runner=gpu-less"})


def test_with_docker_jobs_a_runner_runs_jobs_with_an_image_beside_itself(engine, home, image, server, busybox_image):
    backend = DockerBackend("docker", {"docker_jobs": True, "memory": "512MB"}, server_id=SERVER_ID, home=home)
    [offer] = backend.offers()
    assert offer.resources.docker
    # the job container of a runner on this machine that runs on (this process, in the host's pid namespace,
    # which the runner's container does not share): a runner that starts must leave it alone
    other = engine.containers.run(busybox_image, ["sleep", "120"], detach=True, network_mode="host", labels={
        "dstack.server": SERVER_ID, "dstack.job_id": "not-an-orphan", **_runner_labels()})
    # the job container of a runner whose container is gone: an orphan, which it removes
    gone = {"dstack.runner_pid": "1", "dstack.boot_id": _boot_id(), "dstack.pid_ns": "1",
            "dstack.runner_container": "dstack-runner-long-gone"}
    orphan = engine.containers.create(busybox_image, ["sleep", "120"], network_mode="host", labels={
        "dstack.server": SERVER_ID, "dstack.job_id": "an-orphan", **gone})
    token = server.check(server.admin.post("/api/runners/tokens", json={"name": "docking"}))["token"]
    inst = backend.create(offer, Bootstrap(server_url=server.url, token=token, runner_name="docking",
                                           idle_timeout=120, server_id=SERVER_ID))
    container = engine.containers.get(inst.id)
    host = container.attrs["HostConfig"]
    assert "/var/run/docker.sock:/var/run/docker.sock:rw" in host["Binds"]
    assert host["PidMode"] in ("", "private")  # a namespace of its own (executors/docker.remove_orphans)
    assert "DSTACK_RUNNER_CONTAINER=dstack-runner-docking" in container.attrs["Config"]["Env"]
    assert _registered(server, backend, "docking")["resources"]["docker"] is True
    run = server.submit(INSIDE, "imaged")
    assert _finished(server, run)["status"] == "DONE"
    assert _artifact_files(server, run)["out/note"] == "from a sibling container\n"
    other.reload()  # the runner swept orphans before it took the job
    assert other.status == "running"  # its runner (this process) is alive: no orphan
    assert not engine.containers.list(all=True, filters={"id": orphan.id})
    # what the runner's containers carry: its namespace (not the host's) and its container; a container it left
    # (killed) goes with it
    deadline = time.monotonic() + 20
    while not (warm := engine.containers.list(filters={"label": ["dstack.warm", "dstack.runner_container="
                                                                 "dstack-runner-docking"]})):
        assert time.monotonic() < deadline, "the runner warmed no container for the next job of its image"
        time.sleep(0.2)
    assert warm[0].labels["dstack.pid_ns"] not in ("", _pid_ns()), warm[0].labels
    left = engine.containers.create(busybox_image, ["sleep", "120"], network_mode="host", labels={
        **warm[0].labels, "dstack.job_id": "left-behind", "dstack.server": SERVER_ID})
    assert backend.terminate(inst.id) is True
    assert not engine.containers.list(all=True, filters={"label": "dstack.runner_container=dstack-runner-docking"})
    assert not engine.containers.list(all=True, filters={"id": left.id})
    assert not engine.volumes.list(filters={"label": "dstack.runner=docking"})


def _registered(server: Server, backend: DockerBackend, name: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in server.check(server.admin.get("/api/runners")) if r["name"] == name]
        if found and found[0]["status"] == "READY":
            return found[0]
        assert time.monotonic() < deadline, f"runner {name} did not register: {backend.describe_failure(name)}"
        time.sleep(0.2)


def _finished(server: Server, run: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = server.check(server.admin.get(f"/api/runs/{run}", params={"repo_id": REPO}))
        if info["status"] in ("DONE", "FAILED", "STOPPED"):
            return info
        assert time.monotonic() < deadline, f"{run} is {info['status']} after {timeout} s"
        time.sleep(0.2)


def _artifact_files(server: Server, run: str) -> dict[str, str]:
    """Every file of the run's artifacts, by its path, as the server has it."""
    files = {}
    for artifact in server.check(server.admin.get(f"/api/runs/{run}/artifacts", params={"repo_id": REPO})):
        manifest = server.check(server.admin.get(f"/api/manifests/{artifact['manifest']}"))
        for entry in manifest["entries"]:
            if entry["kind"] == "file":
                path = f"{artifact['path']}/{entry['path']}".replace("/./", "/")
                files[path] = server.admin.get(f"/api/blobs/{entry['hash']}").text
    return files
