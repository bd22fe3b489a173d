"""The autoscaler through the CLI against the real Docker Engine: `dstack backends add docker` (small runners:
1 CPU, 512 MB each), `dstack limits set docker --max-total 3 --idle-timeout 10`, no local runner
(DSTACK_MAX_LOCAL_RUNNERS=0), and 50 host jobs submitted at once. The engine's containers of this server are
sampled every 0.2 s from a thread: never more than 3 runners run at once; every job ends DONE on a docker runner
(`dstack runners --json` says so, with its offer); once idle past the timeout no runner container runs (one is
removed, or kept exited 0 for its log) and `dstack backends --json` counts 0 instances. The runner image is built once for the module (its time is not the
test's); whatever the module made on the engine goes at its end, also after a failure."""

from __future__ import annotations

import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dstack.backends import runner_image, wheelhouse
from tests.e2e.conftest import Dstack

SERVER_ID = f"test-docker-autoscaler-{secrets.token_hex(4)}"
JOBS, MAX_TOTAL, IDLE = 50, 3, 10
WORKFLOWS = "workflows:\n  - name: hello\n    commands: [echo hello from a container]\n"


@pytest.fixture(scope="module")
def engine(docker_client):
    """The engine, and the removal of all the module makes there at its end (a failure included): this server's
    containers and the runner and base image tags that were not there before (as test_docker_backend.py)."""
    before = {t for image in docker_client.images.list() for t in image.tags}
    yield docker_client
    ours = {"label": f"dstack.server={SERVER_ID}"}
    for c in docker_client.containers.list(all=True, filters=ours):
        c.remove(force=True, v=True)
    for v in docker_client.volumes.list(filters=ours):
        v.remove(force=True)
    made = {t for image in docker_client.images.list() for t in image.tags} - before
    for tag in sorted(made, key=lambda t: not t.startswith(runner_image.RUNNER_REPO)):  # runners' before the base
        if tag.startswith((runner_image.RUNNER_REPO, runner_image.BASE_REPO)):
            docker_client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def home(engine, tmp_path_factory) -> Path:
    """The DSTACK_HOME of the module's server: its id chosen here (the label of what its backends make), its
    wheelhouse and the runner image built now, so that the server's first runner finds them."""
    home = tmp_path_factory.mktemp("docker-autoscaler-home")
    (home / "server").mkdir()
    (home / "server" / "server.id").write_text(SERVER_ID + "\n")
    (home / "server" / "server.id").chmod(0o600)
    started = time.monotonic()
    tag = runner_image.ensure(engine, wheelhouse.ensure(home / "server" / "wheels"))
    print(f"runner image {tag}: {time.monotonic() - started:.1f} s")
    return home


class Sampler(threading.Thread):
    """The engine's containers of the server, every 0.2 s: the most that ran at once, and every runner seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="sample-runner-containers")
        import docker

        self.client = docker.from_env()
        self.stop = threading.Event()
        self.most = 0
        self.samples = 0
        self.seen: set[str] = set()
        self.errors: list[str] = []

    def run(self) -> None:
        filters = {"label": [f"dstack.server={SERVER_ID}", "dstack.backend=docker"]}
        while not self.stop.is_set():
            try:
                found = self.client.api.containers(all=True, filters=filters)
            except Exception as e:  # said at the end: a sample missed is no proof
                self.errors.append(str(e))
            else:
                found = [c for c in found if not _spare(c)]  # a spare (no runner yet) is no instance
                running = [c for c in found if c["State"] in ("created", "running", "restarting", "paused")]
                self.most = max(self.most, len(running))
                self.seen.update(c["Labels"]["dstack.runner"] or c["Names"][0].lstrip("/").removeprefix(
                    "dstack-runner-") for c in found)
                self.samples += 1
            self.stop.wait(0.2)

    def running(self) -> int:
        filters = {"label": [f"dstack.server={SERVER_ID}", "dstack.backend=docker"]}
        return len([c for c in self.client.api.containers(all=True, filters=filters)
                    if c["State"] != "exited" and not _spare(c)])


def _spare(c: dict) -> bool:
    return any(n.lstrip("/").startswith("dstack-runner-spare-") for n in c.get("Names") or [])


def test_fifty_jobs_run_on_at_most_three_docker_runners_that_go_once_idle(home, project):
    started = time.monotonic()
    d = Dstack(home, env={"DSTACK_MAX_LOCAL_RUNNERS": "0", "DSTACK_STOP_GRACE": "2"})
    root = project(WORKFLOWS)
    sampler = Sampler()
    try:
        added = d("backends", "add", "docker", "--set", "cpus=1", "--set", "memory=512MB", "--set", "max_runners=10",
                  cwd=root, check=True).stdout
        assert "Added backend docker (docker): Docker Engine" in added and "runner image dstack/runner:" in added, added
        limited = d("limits", "set", "docker", "--max-total", str(MAX_TOTAL), "--idle-timeout", str(IDLE),
                    cwd=root, check=True).stdout
        assert f"at most {MAX_TOTAL}" in limited and f"idle {IDLE}s" in limited, limited
        local = next(b for b in json.loads(d("backends", "--json", cwd=root, check=True).stdout) if b["name"] == "local")
        assert local["settings"]["max_runners"] == 0  # no local runner takes a job

        deadline = time.monotonic() + 60  # the backend keeps a spare container ready (not a runner, not counted)
        while not (spares := [n for n, state, _ in engine_left(spares=True) if "-spare-" in n and state == "running"]):
            assert time.monotonic() < deadline, "no spare container was started"
            time.sleep(0.2)
        sampler.start()
        with ThreadPoolExecutor(8) as pool:
            runs = list(pool.map(lambda _: d("run", "hello", "-d", "--json", cwd=root, check=True).stdout,
                                 range(JOBS)))
        names = {json.loads(r)["run_name"] for r in runs}
        assert len(names) == JOBS
        submitted = time.monotonic()

        docker_runners: list[dict] = []
        deadline = time.monotonic() + 75
        while True:
            listed = d.runs(root)
            statuses = {r["run_name"]: r["status"] for r in listed}
            if not docker_runners:  # while jobs run: the backend's runners, with what they are
                docker_runners = [r for r in json.loads(d("runners", "--json", cwd=root, check=True).stdout)
                                  if r.get("backend") == "docker"]
            if all(statuses.get(n) in ("DONE", "FAILED", "STOPPED", "ABORTED") for n in names):
                break
            done = sum(s == "DONE" for s in statuses.values())
            assert time.monotonic() < deadline, f"{done} of {JOBS} runs DONE after 75 s: {statuses}"
            time.sleep(0.5)
        finished = time.monotonic()
        assert all(statuses[n] == "DONE" for n in names), {n: statuses[n] for n in names if statuses[n] != "DONE"}
        assert docker_runners, "no docker runner was listed while the jobs ran"
        for r in docker_runners:
            assert r["offer"] and r["offer"].startswith("docker"), r
            assert (r["resources"]["cpus"], r["resources"]["memory_mib"]) == (1, 512), r
        assert not [n for n, *_ in engine_left(spares=True) if n == spares[0]], "the spare became a runner (renamed)"
        ran_on = {j["runner"] for r in listed if r["run_name"] in names for j in r["jobs"]}
        assert ran_on <= sampler.seen, f"jobs ran on runners of no docker container: {ran_on - sampler.seen}"

        # idle past the timeout: the runners exit, their containers go, the backend has no instance
        deadline = time.monotonic() + IDLE + 30
        while True:
            docker = next(b for b in json.loads(d("backends", "--json", cwd=root, check=True).stdout)
                          if b["name"] == "docker")
            left = sampler.running()
            if docker["instances"] == 0 and left == 0:
                break
            assert time.monotonic() < deadline, f"{docker['instances']} instances, {left} containers left"
            time.sleep(1)
        idle_gone = time.monotonic()
        sampler.stop.set()
        sampler.join(5)
        # none runs; one whose exit the server's listing saw before its teardown did is kept, exited, for its log
        # (backends/docker.KEEP_EXITED): it must have left cleanly, idle
        left = engine_left()
        assert all(state == "exited" and code == 0 for _, state, code in left), \
            f"runner containers left after the idle timeout: {left}"
        assert sampler.samples > 50 and not sampler.errors, (sampler.samples, sampler.errors[:3])
        assert 1 <= sampler.most <= MAX_TOTAL, f"{sampler.most} runner containers ran at once"
        print(f"submitted in {submitted - started:.1f} s, all DONE after {finished - submitted:.1f} s more, "
              f"runners gone {idle_gone - finished:.1f} s later; {len(sampler.seen)} runners, at most "
              f"{sampler.most} at once, {sampler.samples} samples")
        assert time.monotonic() - started < 120
    finally:
        sampler.stop.set()
        d.stop_server()
    assert not [n for n, *_ in engine_left(spares=True) if "-spare-" in n], "a spare container outlived its server"


def engine_left(spares: bool = False) -> list[tuple[str, str, int]]:
    """The server's containers on the engine (spare ones too, if asked): (name, state, exit code)."""
    import docker

    client = docker.from_env()
    found = [c for c in client.api.containers(all=True, filters={"label": f"dstack.server={SERVER_ID}"})
             if spares or not _spare(c)]
    return [(c["Names"][0], c["State"], client.api.inspect_container(c["Id"])["State"]["ExitCode"]) for c in found]
