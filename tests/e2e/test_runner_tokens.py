"""Runner identities (issue 14, point 1): a runner's token can do only a runner's work, for itself alone; the
admin's token never reaches a runner or a job; `dstack runners add / remove`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests import readable
from tests.e2e.conftest import BIN, add_runner


def test_a_runner_token_is_refused_by_every_route_but_a_runners_own(server, tmp_path):
    """Walks the app's route table, so that a route added later cannot be forgotten."""
    from dstack.server.app import create_app
    from dstack.server.context import Settings
    from dstack.server.routers.deps import RUNNER_API

    url, client = server
    mine, other = add_runner(client, tmp_path, "--name", "mine"), add_runner(client, tmp_path, "--name", "other")
    app = create_app(Settings(home=tmp_path / "unused", db_url="sqlite+aiosqlite://", token="x"))
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {mine['token']}"}, timeout=30)
    checked = 0
    for route in _routes(app.routes):
        methods = getattr(route, "methods", None)
        if not methods or not route.path.startswith("/api/"):
            continue
        runner_route = RUNNER_API in (route.tags or [])
        # on a runner's route, acting for another runner; elsewhere, anything
        path = re.sub(r"\{name\}", "other", route.path)
        path = re.sub(r"\{[a-z_]+\}", "0123456789ab", path)
        for method in methods - {"HEAD"} if "GET" in methods else methods:
            r = http.request(method, path, json={} if method in ("POST", "PUT") else None)
            if not runner_route:
                assert r.status_code == 403, (method, path, r.status_code, r.text)
                assert method == "HEAD" or r.json()["error"]["kind"] == "forbidden"
            elif "{name}" in route.path:
                assert r.status_code == 403 and "cannot act for runner other" in r.text, (method, path, r.text)
            checked += 1
    assert checked >= 20
    # what a runner may do, it does for itself: its registration takes its token's name, whatever it says
    reg = {"hostname": "h", "resources": {"cpus": 1, "memory_mib": 512}, "name": "other"}
    assert http.post("/api/runners/register", json=reg).status_code == 403
    reg.pop("name")
    assert http.post("/api/runners/register", json=reg).json()["name"] == "mine"
    assert http.get("/api/healthz").status_code == 200
    # the code of a job it was not given
    assert http.get("/api/code/" + "ab" * 32).status_code == 403
    # a wrong token, and none
    assert httpx.get(f"{url}/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{url}/api/runs").status_code == 401
    del other


def _routes(routes):
    """The app's routes, those of included routers too (FastAPI wraps them)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


def test_a_self_hosted_runner_joins_with_its_own_token_and_is_removed(server, tmp_path, project):
    url, client = server
    root = project("workflows:\n  - name: peek\n    commands:\n"
                   "      - env | grep -c DSTACK_TOKEN || true\n"
                   "      - \"{ tr '\\\\0' '\\\\n' < /proc/$PPID/environ; } 2>/dev/null | grep -c DSTACK_TOKEN || true\"\n"
                   "  - name: long\n    commands: [sleep 30]\n"
                   "  - name: zoned\n    commands: [echo in zone a]\n    resources:\n      labels: {zone: a}\n"
                   "  - name: elsewhere\n    commands: [echo never]\n    resources:\n      labels: {zone: b}\n")
    issued = add_runner(client, root, "--name", "gpu-box", "--labels", "zone=a")
    shown = client("runners", "add", "--name", "second", cwd=root, check=True)
    assert "its token is shown this once" in shown.stdout and f"dstack-runner start --server {url} --token" \
        in shown.stdout
    dup = client("runners", "add", "--name", "gpu-box", cwd=root)
    assert dup.returncode == 1 and "runner gpu-box has a token already" in dup.stderr
    bad = client("runners", "add", "--labels", "novalue", cwd=root)
    assert bad.returncode == 2 and "write it as KEY=VALUE" in bad.stderr

    runner = subprocess.Popen([str(BIN / "dstack-runner"), "start", "--server", url, "--no-docker",
                               "--workdir", str(tmp_path / "runner")],
                              env={**os.environ, "DSTACK_TOKEN": issued["token"]},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (listed := json.loads(client("runners", "--json", cwd=root, check=True).stdout)):
            assert time.monotonic() < deadline and runner.poll() is None, "the runner did not register"
            time.sleep(0.2)
        assert listed[0]["name"] == "gpu-box" and listed[0]["labels"] == {"zone": "a"}
        assert listed[0]["version"]
        table = client("runners", cwd=root, check=True).stdout
        assert "gpu-box" in table and "zone=a" in table and "self-hosted" in table

        r = client("run", "peek", cwd=root, check=True)
        assert r.stdout.split() == ["0", "0"], r.stdout  # no token in the job's environment, nor its runner's
        # labels: a workflow that asks for them runs only where they are
        assert "in zone a" in client("run", "zoned", cwd=root, check=True).stdout
        refused = client("run", "elsewhere", cwd=root)
        assert refused.returncode == 2 and refused.stderr.startswith(".dstack/workflows.yaml:15:15: error: ")
        assert "runner gpu-box lacks the label zone=b" in refused.stderr, refused.stderr

        client("run", "long", "-d", cwd=root, check=True)
        run = client.runs(root)[0]["run_name"]
        client.wait_status(root, run, {"RUNNING"})
        removing = client("runners", "remove", "gpu-box", cwd=root, check=True)
        job_id = client.run_info(root, run)["jobs"][0]["job_id"]
        assert removing.stdout.strip() == (f"Draining gpu-box: it leaves once job {job_id} has ended (--force stops "
                                           "it)"), removing.stdout
        assert "(draining)" in client("runners", cwd=root, check=True).stdout
        client("runners", "remove", "gpu-box", "--force", cwd=root, check=True)  # stops its job now
        assert client.wait_status(root, run, {"STOPPED"})["status"] == "STOPPED"
        assert runner.wait(timeout=30) == 0, runner.stderr.read()
        # gone, and its token with it
        assert json.loads(client("runners", "--json", cwd=root, check=True).stdout) == []
        refused = httpx.post(f"{url}/api/runners/gpu-box/heartbeat", json={},
                             headers={"Authorization": f"Bearer {issued['token']}"})
        assert refused.status_code == 401
        # a runner that never joined is removed at once
        assert client("runners", "remove", "second", cwd=root, check=True).stdout.strip() == "Removed second."
        missing = client("runners", "remove", "nobody-here", cwd=root)
        assert missing.returncode == 2 and "no runner named 'nobody-here'" in missing.stderr
    finally:
        if runner.poll() is None:
            runner.kill()


def test_local_runners_hold_a_token_of_their_own_that_no_job_can_read(dstack, project):
    root = project("workflows:\n  - name: peek\n    commands:\n"
                   "      - env | grep -c TOKEN || true\n"
                   "      - \"{ tr '\\\\0' '\\\\n' < /proc/$PPID/environ; } 2>/dev/null | grep -c TOKEN || true\"\n")
    r = dstack("run", "peek", cwd=root, check=True)
    assert r.stdout.split() == ["0", "0"], r.stdout
    runner = json.loads(dstack("status", "--json", cwd=root, check=True).stdout)[0]["jobs"][0]["runner"]
    folder = dstack.home / "runners" / runner
    assert not (folder / "runner.token").exists()  # read, then removed
    pid = json.loads((folder / "runner.json").read_text())["pid"]
    environ = Path(f"/proc/{pid}/environ")
    if environ.exists():
        admin = (dstack.home / "server" / "token").read_text().strip()
        assert admin.encode() not in environ.read_bytes()
        assert environ.stat().st_uid == 0  # not dumpable: /proc/PID/* belong to root, not to the runner's user


SYSTEM_PYTHON = Path("/usr/bin/python3.11")


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root and Debian's python3.11")
def test_a_job_of_the_runners_own_user_cannot_read_its_token(server, project):
    """A runner of an ordinary user (nobody), given its token on the command line: its job, of the same user,
    finds the token neither in the runner's command line nor in its environment (unreadable: not dumpable)."""
    import pwd
    import shutil
    import tempfile

    url, client = server
    issued = add_runner(client, Path.cwd(), "--name", "as-nobody")
    folder = Path(tempfile.mkdtemp(prefix="dstack-nobody-"))
    nobody = pwd.getpwnam("nobody")
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    root = project("workflows:\n  - name: peek\n    commands:\n"
                   f"      - grep -c {issued['token']} /proc/$PPID/cmdline || true\n"
                   "      - cat /proc/$PPID/environ > /dev/null 2>&1 && echo readable || echo unreadable\n"
                   "      - id -un\n")
    runner = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={readable.for_user('nobody').pythonpath}",
         f"HOME={folder}",
         str(SYSTEM_PYTHON), "-m", "dstack.runner.main", "start", "--server", url, "--token", issued["token"],
         "--no-docker", "--workdir", str(folder / "runner")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not json.loads(client("runners", "--json", cwd=root, check=True).stdout):
            assert time.monotonic() < deadline and runner.poll() is None, f"no runner: {runner.stderr.read()}"
            time.sleep(0.2)
        r = client("run", "peek", cwd=root, check=True)
        assert r.stdout.split() == ["0", "unreadable", "nobody"], r.stdout
    finally:
        runner.terminate()
        try:
            runner.wait(timeout=20)
        except subprocess.TimeoutExpired:
            runner.kill()
        shutil.rmtree(folder, ignore_errors=True)
