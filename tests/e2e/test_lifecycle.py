"""Tags, stop, Ctrl-C, lost runners, tokens."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest

from tests.e2e.conftest import Dstack, gone, jobs_dir, last_run

SLEEPY = """\
workflows:
  - name: sleepy
    {image}
    commands:
      - echo started
      - {sleep}
    artifacts:
      - out
"""


def _submit(dstack, root, *args) -> str:
    r = dstack("run", *args, "-d", cwd=root, check=True)
    return re.search(r"Run (\S+)", r.stderr).group(1)


def test_tags_move_list_untag(dstack, project):
    root = project("workflows:\n  - name: a\n    commands: [echo a]\n  - name: b\n    commands: [exit 1]\n")
    dstack("run", "a", cwd=root, check=True)
    first = last_run(dstack, root)["run_name"]
    dstack("run", "a", cwd=root, check=True)
    second = last_run(dstack, root)["run_name"]
    assert dstack("run", "b", cwd=root).returncode == 1
    failed = last_run(dstack, root)["run_name"]

    dstack("tag", first, "latest", cwd=root, check=True)
    r = dstack("tag", second, "latest", cwd=root, check=True)
    assert f"moved from {first}" in r.stdout
    r = dstack("tag", failed, "latest", cwd=root)
    assert r.returncode != 0 and "only DONE runs can be tagged" in r.stderr
    dstack("tag", first, "v1", cwd=root, check=True)
    tags = json.loads(dstack("tags", "--json", cwd=root, check=True).stdout)
    assert sorted((t["name"], t["run_name"]) for t in tags) == [("latest", second), ("v1", first)]
    assert "latest" in dstack("tags", cwd=root, check=True).stdout

    assert "removed a:v1" in dstack("untag", "a:v1", cwd=root, check=True).stdout
    assert "removed a:latest" in dstack("untag", second, cwd=root, check=True).stdout
    assert json.loads(dstack("tags", "--json", cwd=root, check=True).stdout) == []
    assert dstack("untag", "latest", cwd=root).returncode != 0


@pytest.mark.parametrize("image", [False, True])
def test_stop_ends_a_running_job_within_seconds(dstack, project, busybox_image, image):
    root = project(SLEEPY.format(image=f"image: {busybox_image}" if image else "",
                                 sleep="mkdir -p out && echo partial > out/x && sleep 300"))
    name = _submit(dstack, root, "sleepy")
    dstack.wait_status(root, name, {"RUNNING"})
    time.sleep(0.5)
    t = time.monotonic()
    r = dstack("stop", name, cwd=root, check=True)
    assert time.monotonic() - t < 10
    assert r.stdout.strip() == f"{name} STOPPED"
    info = dstack.run_info(root, name)
    assert info["jobs"][0]["artifacts"][0]["path"] == "out"  # a stopped job's artifacts are saved


def test_stop_kills_a_job_that_ignores_sigterm_after_the_grace(dstack, project):
    root = project(SLEEPY.format(image="", sleep="trap '' TERM; sleep 300 & wait; sleep 300"))
    name = _submit(dstack, root, "sleepy")
    dstack.wait_status(root, name, {"RUNNING"})
    t = time.monotonic()
    r = dstack("stop", name, cwd=root, check=True)
    assert time.monotonic() - t < 2 + 8  # DSTACK_STOP_GRACE=2 in this session
    assert dstack.run_info(root, name)["status"] == "STOPPED"
    assert f"Waiting for {name} to exit (SIGTERM sent; SIGKILL in 2s)" in r.stderr, r.stderr  # not silent


def test_stopping_a_run_that_has_ended_says_so(dstack, project):
    root = project("workflows:\n  - name: quick\n    commands: [echo quick]\n")
    dstack("run", "quick", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]
    r = dstack("stop", name, cwd=root, check=True)
    assert r.stdout.strip() == f"{name} had already ended: DONE; nothing to stop"
    assert dstack.run_info(root, name)["status"] == "DONE"


def test_abort_saves_no_artifacts(dstack, project):
    root = project(SLEEPY.format(image="", sleep="mkdir -p out && sleep 300"))
    name = _submit(dstack, root, "sleepy")
    dstack.wait_status(root, name, {"RUNNING"})
    assert dstack("stop", name, "--abort", cwd=root, check=True).stdout.strip() == f"{name} ABORTED"
    assert dstack.run_info(root, name)["jobs"][0]["artifacts"] == []


def test_ctrl_c_without_a_terminal_stops_the_run(dstack, project):
    root = project(SLEEPY.format(image="", sleep="sleep 300"))
    p = dstack.popen("run", "sleepy", cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    out = b""
    while b"started" not in out:
        out += p.stdout.read1(100)
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=20)
    assert code == 130
    assert last_run(dstack, root)["status"] == "STOPPED"


def test_ctrl_c_in_a_terminal_asks_and_can_detach(dstack, project):
    root = project(SLEEPY.format(image="", sleep="sleep 300"))
    master, slave = os.openpty()
    p = dstack.popen("run", "sleepy", cwd=root, stdin=slave, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    out = b""
    while b"started" not in out:
        out += p.stdout.read1(100)
    p.send_signal(signal.SIGINT)
    prompt = b""
    while b"[d]etach" not in prompt:
        prompt += os.read(master, 1000)
    os.write(master, b"d\n")
    assert p.wait(timeout=20) == 0
    os.close(master)
    name = last_run(dstack, root)["run_name"]
    assert dstack.run_info(root, name)["status"] == "RUNNING"
    dstack("stop", name, "--abort", cwd=root, check=True)


@pytest.mark.parametrize("image", [False, True])
def test_a_killed_runner_fails_its_job_within_the_timeout(tmp_path, project, busybox_image, docker_client, image):
    """Its own server: the runner timeout is 3 s here (DSTACK_RUNNER_TIMEOUT)."""
    d = Dstack(tmp_path / "home", env={"DSTACK_RUNNER_TIMEOUT": "3"})
    try:
        if image:
            root = project(SLEEPY.format(image=f"image: {busybox_image}", sleep="sleep 300"))
            name = _submit(d, root, "sleepy")
            info = d.wait_status(root, name, {"RUNNING"})
            runner, job_id = info["jobs"][0]["runner"], info["jobs"][0]["job_id"]
            _kill_runner(runner)
            info = d.wait_status(root, name, {"FAILED"}, timeout=3 + 7)
            assert f"runner {runner} stopped responding" in info["jobs"][0]["reason"]
            deadline = time.monotonic() + 10
            # removed, not only stopped: the wait covers the removal too
            while time.monotonic() < deadline and docker_client.containers.list(
                    all=True, sparse=True, filters={"name": f"dstack-{job_id}"}):
                time.sleep(0.2)
            assert not docker_client.containers.list(all=True, sparse=True, filters={"name": f"dstack-{job_id}"})
            return
        root = project(SLEEPY.format(image="", sleep="echo $$ > /tmp/dstack-e2e-$JOB_ID.pid; sleep 300"))
        name = _submit(d, root, "sleepy")
        info = d.wait_status(root, name, {"RUNNING"})
        runner, job_id = info["jobs"][0]["runner"], info["jobs"][0]["job_id"]
        _kill_runner(runner)
        t = time.monotonic()
        info = d.wait_status(root, name, {"FAILED"}, timeout=3 + 7)
        assert time.monotonic() - t < 10
        assert f"runner {runner} stopped responding" in info["jobs"][0]["reason"]
        # the job's processes died with their runner
        deadline = time.monotonic() + 5
        job_pid = int(open(f"/tmp/dstack-e2e-{job_id}.pid").read())
        while time.monotonic() < deadline and os.path.exists(f"/proc/{job_pid}"):
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{job_pid}")
    finally:
        d.stop_server()


def test_every_endpoint_needs_the_token(dstack, tmp_path):
    dstack("status", cwd=tmp_path, check=True)  # the server runs
    info = json.loads((dstack.home / "server" / "server.json").read_text())
    token_file = dstack.home / "server" / "token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert info["url"].startswith("http://127.0.0.1:")
    for method, path in (("GET", "/api/runs"), ("GET", "/api/healthz"), ("GET", "/api/runners"),
                         ("POST", "/api/runs"), ("GET", "/docs"), ("GET", "/openapi.json")):
        r = httpx.request(method, info["url"] + path)
        assert r.status_code in (401, 404), (path, r.status_code)
        r = httpx.request(method, info["url"] + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code in (401, 404), (path, r.status_code)
    ok = httpx.get(info["url"] + "/api/healthz", headers={"Authorization": f"Bearer {token_file.read_text()}"})
    assert ok.status_code == 200


def test_runners_lists_the_local_runner(dstack, project):
    root = project("workflows:\n  - name: a\n    commands: [echo a]\n")
    dstack("run", "a", cwd=root, check=True)
    runners = json.loads(dstack("runners", "--json", cwd=root, check=True).stdout)
    assert any(r["backend"] == "local" and r["status"] in ("READY", "BUSY") for r in runners)
    assert "RUNNER" in dstack("runners", cwd=root, check=True).stdout


def test_run_with_tag_tags_the_run_once_it_is_done(dstack, project):
    root = project("workflows:\n  - name: a\n    commands: [echo a]\n  - name: b\n    commands: [exit 1]\n")
    r = dstack("run", "a", "-t", "best", cwd=root, check=True)
    assert "Tagged a:best" in r.stderr
    done = last_run(dstack, root)
    assert done["tags"] == ["best"]
    r = dstack("run", "b", "--tag", "best", cwd=root)
    assert r.returncode == 1 and "Not tagged b:best: the run is FAILED" in r.stderr
    assert last_run(dstack, root)["tags"] == []  # a failed run is not tagged
    name = _submit(dstack, root, "a", "-t", "best")  # detached: the server tags it when it ends
    assert dstack.wait_status(root, name, {"DONE"})["tags"] == ["best"]
    assert dstack.run_info(root, done["run_name"])["tags"] == []
    r = dstack("run", "a", "-t", "bad tag", cwd=root)
    assert r.returncode == 2 and "not a tag name" in r.stderr


def _kill_runner(name: str) -> None:
    pid = int(subprocess.check_output(["pgrep", "-f", f"dstack.runner.main start .*--name {name}"]).split()[0])
    os.kill(pid, signal.SIGKILL)


def test_a_job_can_be_named_by_a_unique_prefix_of_its_id(dstack, project):
    root = project("workflows:\n  - name: a\n    commands: [echo prefixed]\n")
    dstack("run", "a", cwd=root, check=True)
    job_id = last_run(dstack, root)["jobs"][0]["job_id"]
    assert "prefixed" in dstack("logs", job_id[:6], cwd=root, check=True).stdout


def test_run_without_a_workflow_lists_them(dstack, project):
    root = project("workflows:\n  - name: alpha\n    help: the first one\n    commands: [x]\n"
                   "  - name: beta\n    commands: [y]\n")
    r = dstack("run", cwd=root)
    assert r.returncode == 2 and "alpha" in r.stderr and "the first one" in r.stderr and "beta" in r.stderr


def test_logs_follow_ctrl_c_leaves_the_run_running(dstack, project):
    root = project(SLEEPY.format(image="", sleep="sleep 300"))
    name = _submit(dstack, root, "sleepy")
    dstack.wait_status(root, name, {"RUNNING"})
    p = dstack.popen("logs", name, "-f", cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    out = b""
    while b"started" not in out:
        out += p.stdout.read1(100)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=20) == 130
    assert dstack.run_info(root, name)["status"] == "RUNNING"
    dstack("stop", name, "--abort", cwd=root, check=True)


def test_server_stop_refuses_while_runs_are_unfinished(dstack, project):
    root = project(SLEEPY.format(image="", sleep="sleep 300"))
    name = _submit(dstack, root, "sleepy")
    dstack.wait_status(root, name, {"RUNNING"})
    r = dstack("server", "stop", cwd=root)
    assert r.returncode == 1 and name in r.stderr and "--force" in r.stderr
    assert dstack.run_info(root, name)["status"] == "RUNNING"  # the server still runs
    dstack("stop", name, "--abort", cwd=root, check=True)


def test_server_stop_force_fails_the_jobs_it_loses_and_says_why(dstack, project):
    root = project(SLEEPY.format(image="", sleep="sleep 300"))
    name = _submit(dstack, root, "sleepy")
    dstack.wait_status(root, name, {"RUNNING"})
    dstack("server", "stop", "--force", cwd=root, check=True)
    job = dstack.run_info(root, name)["jobs"][0]  # a new server answers
    assert job["status"] == "FAILED" and job["reason"] == "the local server was stopped while the job ran", job


def test_a_local_server_of_another_version_is_replaced_when_idle(dstack, project):
    root = project("workflows:\n  - name: a\n    commands: [echo a]\n  - name: long\n    commands: [sleep 30]\n")
    dstack("status", cwd=root, check=True)
    info_file = dstack.home / "server" / "server.json"
    old = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**old, "version": "0.0.1"}))  # as a server of an older dstack leaves it
    r = dstack("run", "a", cwd=root)
    assert r.returncode == 0, r.stderr
    new = json.loads(info_file.read_text())
    assert new["pid"] != old["pid"] and gone(old["pid"])
    # with a run unfinished, it is left running, and the error says what to do
    dstack("run", "long", "-d", cwd=root, check=True)
    info_file.write_text(json.dumps({**new, "version": "0.0.1"}))
    r = dstack("status", cwd=root)
    assert r.returncode == 1 and "runs dstack 0.0.1" in r.stderr and "unfinished runs" in r.stderr, r.stderr
    assert os.path.exists(f"/proc/{new['pid']}/status")
    info_file.write_text(json.dumps(new))
    dstack("stop", "--abort", last_run(dstack, root)["run_name"], cwd=root, check=True)


def test_a_run_is_found_by_name_from_another_project(dstack, project):
    root = project("workflows:\n  - name: a\n    commands: [echo from-a]\n", name="proj-a")
    other = project("workflows:\n  - name: b\n    commands: [echo b]\n", name="proj-b")
    dstack("run", "a", cwd=root, check=True)
    name = last_run(dstack, root)["run_name"]
    assert "from-a" in dstack("logs", name, cwd=other, check=True).stdout
    assert json.loads(dstack("status", name, "--json", cwd=other, check=True).stdout)["run_name"] == name
    assert name not in dstack("status", cwd=other, check=True).stdout  # the listing is still the project's


def test_a_docker_job_after_another_starts_in_a_warm_container(tmp_path, project, busybox_image, docker_client):
    """Its own server, to see its runner's waiting container go with it."""
    d = Dstack(tmp_path / "home")
    root = project(f"workflows:\n  - name: pid1\n    image: {busybox_image}\n    commands:\n"
                   "      - tr '\\0' ' ' < /proc/1/cmdline\n")

    def waiting():  # the waiting containers of this server's runners, by the folders they bind
        return [c for c in docker_client.containers.list(all=True, filters={"label": "dstack.warm"})
                if any(str(jobs_dir(w)) in m["Source"] for m in c.attrs["Mounts"]
                       for w in (tmp_path / "home").glob("runners/*"))]

    def warmed() -> int:  # the runner says so once a container is ready for the next job
        return sum(f.read_text().count("waits for the next job")
                   for f in (tmp_path / "home").glob("runners/*/runner.log"))

    def wait_warm(n: int) -> None:
        deadline = time.monotonic() + 15
        while warmed() < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert warmed() == n

    try:
        first = d("run", "pid1", cwd=root, check=True).stdout
        assert "set -e" in first  # a container created for it: the job's script is its command
        wait_warm(1)
        assert len(waiting()) == 1
        second = d("run", "pid1", cwd=root, check=True).stdout
        assert "/.dstack-runner/go" in second  # started in the waiting container
        wait_warm(2)
    finally:
        d.stop_server()
    assert not waiting()  # the runner removed its waiting container as it exited


def test_a_job_submitted_after_its_idle_runner_was_killed_runs_on_another(tmp_path, project):
    """The killed runner's long poll for a job is still open on the server: it must not be handed the job.
    Its own server, with a 3 s runner timeout."""
    d = Dstack(tmp_path / "home", env={"DSTACK_RUNNER_TIMEOUT": "3"})
    root = project("workflows:\n  - name: quick\n    commands: [echo quick]\n")
    try:
        d("run", "quick", cwd=root, check=True)
        first = last_run(d, root)["jobs"][0]["runner"]
        _kill_runner(first)
        time.sleep(1)
        r = d("run", "quick", cwd=root, timeout=60)
        job = last_run(d, root)["jobs"][0]
        assert r.returncode == 0 and job["status"] == "DONE", (r.stderr, job)
        assert job["runner"] != first
    finally:
        d.stop_server()


def test_status_says_how_many_runs_it_leaves_out_and_whose_runs_it_shows(dstack, project, tmp_path):
    root = project("workflows:\n  - name: a\n    commands: [echo a]\n", name="many")
    for _ in range(4):
        dstack("run", "a", "-d", cwd=root, check=True)
    r = dstack("status", "-n", "3", cwd=root, check=True)
    assert "1 more: `dstack status -n 4` or `dstack status -a` shows all 4" in r.stderr, r.stderr
    r = dstack("status", "-n", "1", cwd=root, check=True)  # -n 2 would not show the 3 it leaves out: said
    assert "3 more: `dstack status -n 2` shows 1 of them, `dstack status -a` all 4" in r.stderr, r.stderr
    assert "more:" not in dstack("status", "-a", cwd=root, check=True).stderr
    elsewhere = tmp_path / "no-project"
    elsewhere.mkdir()
    r = dstack("status", cwd=elsewhere, check=True)
    assert f"No .dstack/ folder here or above: the runs of {elsewhere}" in r.stderr, r.stderr


def test_a_run_that_waits_for_a_runner_says_so(tmp_path, project):
    d = Dstack(tmp_path / "home", env={"DSTACK_MAX_LOCAL_RUNNERS": "1"})
    cpus = len(os.sched_getaffinity(0))  # the long job takes every CPU of the one runner: the quick one waits
    root = project(f"workflows:\n  - name: long\n    commands: [sleep 60]\n    resources: {{cpu: {cpus}}}\n"
                   "  - name: quick\n    commands: [echo quick]\n")
    try:
        first = _submit(d, root, "long")
        d.wait_status(root, first, {"RUNNING"})
        waiting = d.popen("run", "quick", cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(5)  # it waits: the one local runner there may be is busy
        d("stop", "--abort", first, cwd=root, check=True)
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0 and b"quick" in out, err
        assert b"waits for a runner that can run it" in err, err
    finally:
        d.stop_server()
