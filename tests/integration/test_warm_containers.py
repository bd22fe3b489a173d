"""Warm containers on the real Docker Engine: which jobs may start in a container started before them,
which start cold instead (and still run), and that no waiting container outlives its executor.
The behaviours every job must show in a warm container are in test_executors.py (kind docker-warm)."""

from __future__ import annotations

import io
import logging
import os
import tarfile
import threading
import time
import uuid

import pytest
from tests.conftest import HOST_BUSYBOX

from dstack.core.code import CodeSnapshot
from dstack.core.models import JobSpec
from dstack.runner.executors import Mount
from dstack.runner.executors.docker import DockerExecutor


def _job(image: str, commands: list[str], **spec) -> JobSpec:
    return JobSpec(job_id=uuid.uuid4().hex[:12], run_name="warm-run-1", workflow="w", provider="docker",
                   image=image, commands=commands, **spec)


def _run(executor: DockerExecutor, job: JobSpec, root, mounts=(), env=None):
    out = []
    execution = executor.start(job, root, list(mounts), env or {}, out.append)
    code = execution.wait()
    execution.dispose()
    return execution, code, b"".join(out)


def _waiting(docker_client, under) -> list:
    """The warm containers this process started (labelled with its pid: not a runner's of the e2e tests, nor
    another session's) whose folders lie under `under`."""
    mine = {"label": ["dstack.warm", f"dstack.runner_pid={os.getpid()}"]}
    return [c for c in docker_client.containers.list(all=True, filters=mine)
            if any(m["Source"].startswith(str(under)) for m in c.attrs["Mounts"])]


def _build(docker_client, base: str, extra: str) -> str:
    tag = f"dstack-test/warm-{uuid.uuid4().hex[:8]}:latest"
    dockerfile = f"FROM {base}\n{extra}\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    buf.seek(0)
    docker_client.images.build(fileobj=buf, custom_context=True, tag=tag, pull=False, rm=True)
    return tag


@pytest.fixture
def executor(docker_client, tmp_path_factory):
    ex = DockerExecutor(docker_client)
    yield ex
    ex.close()  # a container that ran a job is removed in the background once its exit code is known
    base = tmp_path_factory.getbasetemp()
    deadline = time.monotonic() + 10
    while _waiting(docker_client, base) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _waiting(docker_client, base), "a waiting container outlived close()"


def test_the_next_job_of_a_kind_starts_in_the_container_warmed_for_it(executor, busybox_image, tmp_path,
                                                                      docker_client):
    first = _job(busybox_image, ["echo one"])
    root = tmp_path / "next" / "code"
    assert executor.warm(first, root)
    assert not executor.warm(first, tmp_path / "other" / "code")  # one per kind
    waiting = _waiting(docker_client, tmp_path)
    assert [c.status for c in waiting] == ["running"]
    second = _job(busybox_image, ["echo \"$0 in $(pwd) as $RUN_NAME\"", "exit 4"], working_dir="sub")
    assert executor.claim(second) == root.resolve()
    assert executor.claim(_job(busybox_image, ["true"])) is None  # taken
    (root / "sub").mkdir()
    execution, code, out = _run(executor, second, root)
    assert execution.warm
    assert (code, out) == (4, b"/bin/sh in /workflow/sub as warm-run-1\r\n")
    assert execution.container.id == waiting[0].id


def test_jobs_that_a_warm_container_cannot_run_exactly_start_cold(executor, busybox_image, tmp_path,
                                                                  monkeypatch):
    assert not executor.warm(_job(busybox_image, []), tmp_path / "a")  # no commands: the image's CMD
    dep = _job(busybox_image, ["true"], dependencies=[{"ref": "p:latest", "run_name": "p-1", "job_id": "1" * 12,
                                                       "artifacts": ["data"]}])
    assert not executor.warm(dep, tmp_path / "b")
    sub = _job(busybox_image, ["true"], code=CodeSnapshot(mode="archive", subdir="project", archive_hash="x",
                                                          tree_hash="y"))
    assert not executor.warm(sub, tmp_path / "c")
    monkeypatch.setenv("DSTACK_WARM_CONTAINERS", "0")
    assert not executor.warm(_job(busybox_image, ["true"]), tmp_path / "d")


def test_an_image_with_an_entrypoint_is_never_warmed(executor, busybox_image, docker_client, tmp_path):
    tag = _build(docker_client, busybox_image, 'ENV GREETING=hello\nENTRYPOINT ["/bin/sh", "-c", '
                                               '"echo entrypoint saw ${NAME:-nothing}; exec \\"$@\\"", "--"]')
    try:
        job = _job(tag, ["echo job"], env={"NAME": "the job"})
        assert not executor.warm(job, tmp_path / "w" / "code")
        assert executor.claim(job) is None
        execution, code, out = _run(executor, job, tmp_path)
        assert not execution.warm and code == 0
        assert out == b"entrypoint saw the job\r\njob\r\n"
    finally:
        docker_client.images.remove(tag, force=True)


def test_a_claimed_container_that_cannot_run_the_job_is_removed_and_the_job_starts_cold(
        executor, busybox_image, docker_client, tmp_path_factory):
    dep = tmp_path_factory.mktemp("dep")
    (dep / "a.txt").write_text("from prepare\n")
    root = tmp_path_factory.mktemp("warm") / "code"
    job = _job(busybox_image, ["cat data/a.txt"])
    assert executor.warm(job, root)
    waiting = _waiting(docker_client, root.parent)
    assert executor.claim(job) == root.resolve()
    execution, code, out = _run(executor, job, root, [Mount(dep, "data")])  # mounts are fixed at creation
    assert not execution.warm
    assert (code, out) == (0, b"from prepare\r\n")
    assert not [c for c in waiting if c.id in {w.id for w in _waiting(docker_client, root.parent)}]
    assert not (root.parent / "code.control").exists()


PROBE = [  # what a job sees of its process, shell and environment
    'echo "$0|$#|$PPID|$PWD|${OLDPWD-unset}|${SHLVL-unset}|$(cat /proc/self/status | grep -c NoNewPrivs)"',
    "echo \"[$X] [$U] [$IFS]\"",
    "env | sort | grep -v '^JOB_ID=\\|^HOSTNAME='",
]


def test_a_job_in_a_warm_container_sees_what_it_sees_in_a_container_made_for_it(
        executor, busybox_image, tmp_path_factory):
    env = {"X": "a 'b' \"c\" $d `e`\nnew line", "U": "é✓", "IFS": ":", "PWD": "/tmp", "PPID": "77",
           "A-B": "not a shell name"}
    seen = {}
    for how in ("cold", "warm"):
        job = _job(busybox_image, PROBE, working_dir="sub dir")
        root = tmp_path_factory.mktemp(how) / "code"
        if how == "warm":
            assert executor.warm(job, root)
            assert executor.claim(job) == root.resolve()
        else:
            root.mkdir()
        execution, code, out = _run(executor, job, root, env=env)
        assert execution.warm == (how == "warm")
        seen[how] = (code, out)
    assert seen["warm"] == seen["cold"]
    assert seen["cold"][1].startswith(b"/bin/sh|0|1|/workflow/sub dir|unset|1|")


def test_stop_gives_the_jobs_last_command_its_sigterm_in_a_warm_container_too(executor, busybox_image, tmp_path,
                                                                            docker_client):
    job = _job(busybox_image, ["echo started", "exec sh -c 'trap \"echo caught TERM; exit 0\" TERM; "
                                              "echo ready; while :; do sleep 0.1; done'"])
    assert executor.warm(job, tmp_path / "code")
    executor.claim(job)
    out = []
    execution = executor.start(job, tmp_path / "code", [], {}, out.append)
    deadline = time.monotonic() + 10
    while b"ready" not in b"".join(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    while docker_client.containers.get(execution.container.id).name != f"dstack-{job.job_id}":
        assert time.monotonic() < deadline, "a running job's warm container is named for the job"
        time.sleep(0.05)
    execution.stop(grace=5)
    assert execution.warm and execution.wait() == 0
    execution.dispose()
    assert b"caught TERM" in b"".join(out)


def test_an_image_whose_containers_cannot_wait_is_tried_once(executor, docker_client, tmp_path, caplog):
    tag = f"dstack-test/warm-nosh-{uuid.uuid4().hex[:8]}:latest"  # busybox without its /bin/sh link
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dockerfile = b"FROM scratch\nCOPY busybox /bin/busybox\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(str(HOST_BUSYBOX), arcname="busybox")
    buf.seek(0)
    docker_client.images.build(fileobj=buf, custom_context=True, tag=tag, pull=False, rm=True)
    try:
        job = _job(tag, ["echo hi"])
        caplog.set_level(logging.INFO, logger="dstack.runner.executors.docker")
        assert not executor.warm(job, tmp_path / "a" / "code")
        assert not executor.warm(job, tmp_path / "b" / "code")
        assert len([r for r in caplog.records if "can wait for jobs" in r.getMessage()]) == 1  # tried once
        assert not _waiting(docker_client, tmp_path)
    finally:
        docker_client.images.remove(tag, force=True)


def test_a_waiting_container_removed_by_hand_costs_the_next_job_no_time(executor, busybox_image, docker_client,
                                                                      tmp_path):
    job = _job(busybox_image, ["echo fine"])
    assert executor.warm(job, tmp_path / "code")
    for c in _waiting(docker_client, tmp_path):
        c.remove(force=True)
    assert executor.claim(job) is not None
    started = time.monotonic()
    execution, code, out = _run(executor, job, tmp_path / "code")
    assert (execution.warm, code, out) == (False, 0, b"fine\r\n")
    assert time.monotonic() - started < 1.5  # told at once, not after the FIFO's timeout


def test_a_tag_moved_to_another_image_starts_cold_in_the_new_image(executor, busybox_image, docker_client,
                                                                  tmp_path):
    tag = _build(docker_client, busybox_image, "ENV VERSION=1")
    try:
        job = _job(tag, ["echo version $VERSION"])
        root = tmp_path / "code"
        assert executor.warm(job, root)
        _build_as(docker_client, busybox_image, "ENV VERSION=2", tag)
        assert executor.claim(job) == root.resolve()
        execution, code, out = _run(executor, job, root)
        assert not execution.warm
        assert (code, out) == (0, b"version 2\r\n")
    finally:
        docker_client.images.remove(tag, force=True)


def _build_as(docker_client, base: str, extra: str, tag: str) -> None:
    built = _build(docker_client, base, extra)
    docker_client.images.get(built).tag(tag)
    docker_client.images.remove(built)


def test_release_and_close_remove_what_waits_even_while_it_starts(busybox_image, docker_client, tmp_path):
    executor = DockerExecutor(docker_client)
    job = _job(busybox_image, ["true"])
    assert executor.warm(job, tmp_path / "a" / "code")
    assert executor.claim(job) is not None
    executor.release(job)  # e.g. its code could not be recreated
    assert not _waiting(docker_client, tmp_path)
    assert not (tmp_path / "a" / "code.control").exists()
    other = _job("dstack-test/busybox:latest", ["true"], requirements={"shm_size": "64MB"})
    warming = threading.Thread(target=executor.warm, args=(other, tmp_path / "b" / "code"))
    warming.start()
    executor.close()  # waits for the one being started, then removes it
    warming.join()
    assert not _waiting(docker_client, tmp_path)
    assert not executor.warm(job, tmp_path / "c" / "code")  # closed: nothing more is warmed


def test_a_script_and_variables_larger_than_a_pipe_reach_a_warm_container_whole(executor, busybox_image, tmp_path):
    job = _job(busybox_image, [f"echo {'x' * 100_000} | wc -c", 'printf %s "$BIG" | wc -c'])
    assert executor.warm(job, tmp_path / "code")
    executor.claim(job)
    execution, code, out = _run(executor, job, tmp_path / "code", env={"BIG": "y" * 120_000})  # under Linux's 128 KiB per string, as cold
    assert execution.warm
    assert (code, out.split()) == (0, [b"100001", b"120000"])
