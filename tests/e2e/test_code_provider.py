"""The `code` provider: code-server installed from the npm registry (once per version, into the job's home) and
serving on the job's port, letting in who logs in with the run's password and sending everyone else to its login
page; its URL and password printed once it answers, neither in what the API says of the job; `dstack stop` ends it.
A runner's host without what the install needs fails the job with a message naming it."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from dstack.providers.vscode import DEFAULT_VERSION, INSTALL_ROOT, CodeProvider, CodeSpec
from dstack.runner.executors.base import job_script
from tests.e2e.conftest import log_match

PYTHON = Path("/usr/bin/python3.11")


def _node_major() -> str | None:
    node = shutil.which("node")
    if not node:
        return None
    return subprocess.run([node, "-p", "process.versions.node.split('.')[0]"], capture_output=True,
                          text=True).stdout.strip()


def _can_install() -> bool:
    """What code-server 4.100's install needs (or it is installed already, in this user's home)."""
    installed = (Path(INSTALL_ROOT).expanduser() / DEFAULT_VERSION / "bin" / "code-server").exists()
    if installed:
        return True
    tools = all(shutil.which(t) for t in ("npm", "make", "c++", "pkg-config", "rg"))
    return tools and subprocess.run(["pkg-config", "--exists", "krb5-gssapi"]).returncode == 0


def _request(port: str, method: str, path: str, body: str | None = None, cookie: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=20)
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    if cookie:
        headers["Cookie"] = cookie
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.getheader("Location"), r.getheader("Set-Cookie"), r.read().decode(errors="replace")


@pytest.mark.skipif(not PYTHON.exists(), reason="needs Debian's python3.11 (scripts/test.sh)")
@pytest.mark.skipif(_node_major() != "20", reason="code-server 4.100 needs Node.js 20 on the runner's host")
@pytest.mark.skipif(not _can_install(), reason="needs npm, g++, make, pkg-config, libkrb5-dev, ripgrep (scripts/test.sh)")
def test_code_answers_with_its_password(dstack, project):
    root = project("""\
    workflows:
      - name: ide
        provider: code
        python: 3.11
        setup:
          - echo setting up
    """)
    run = json.loads(dstack("run", "ide", "--json", cwd=root, check=True).stdout)["run_name"]
    try:
        found, logs = _ready(dstack, root, run)
        assert logs.index("setting up") < found.start()  # setup ran first
        port, password = found.group(1), found.group(2)
        status, location, _, _ = _request(port, "GET", "/")
        assert status == 302 and location.endswith("login")  # no session: its login page
        status, _, cookie, _ = _request(port, "POST", "/login", body=urllib.parse.urlencode({"password": password}))
        assert status == 302 and cookie and cookie.startswith("code-server-session=")
        session = cookie.split(";")[0]
        status, location, _, _ = _request(port, "GET", "/", cookie=session)
        assert status == 302 and "folder=" in location  # in: it opens the job's working folder
        opened = urllib.parse.urlsplit(urllib.parse.urljoin(f"http://127.0.0.1:{port}/", location))
        status, _, _, page = _request(port, "GET", f"{opened.path}?{opened.query}", cookie=session)
        assert status == 200 and "workbench" in page
        status, location, _, _ = _request(port, "GET", "/", cookie="code-server-session=forged")
        assert status == 302 and location.endswith("login")
        spec = json.dumps(dstack.run_info(root, run)["jobs"])
        assert password not in spec  # in the job's log only, never in what the API says of the job
    finally:
        dstack("stop", run, cwd=root)
    assert dstack.wait_status(root, run, {"STOPPED", "DONE", "FAILED", "ABORTED"}, timeout=60)["status"] != "FAILED"

    # the install is one of the workflow's `cache:` folders: the next run on the runner starts without one
    again = json.loads(dstack("run", "ide", "--json", cwd=root, check=True).stdout)["run_name"]
    try:
        found, logs = _ready(dstack, root, again, within=120)
        assert "Installing code-server" not in logs, logs[-3000:]
    finally:
        dstack("stop", again, cwd=root)
    dstack.wait_status(root, again, {"STOPPED", "DONE", "FAILED", "ABORTED"}, timeout=60)


def _ready(dstack, root, run: str, within: float = 480):
    """The run's "VS Code is ready" line (port, password) once it is in its log, and the log; a first install builds
    native modules (~65 s here), later ones take seconds."""
    return log_match(dstack, root, run, r"VS Code is ready: http://[^:/\s]+:(\d+)/\s+VS Code password: ([0-9a-f]{48})",
                     within)


def test_a_host_without_the_build_tools_is_told_what_to_install(dstack, project):
    root = project("""\
    workflows:
      - name: ide
        provider: code
        python: 3.11
        version: "0.0.1"  # installed nowhere: the job would have to install it
        env:
          PATH: /nonexistent  # a host without any of what the install needs (bash's builtins still run)
    """)
    run = json.loads(dstack("run", "ide", "--json", cwd=root, check=True).stdout)["run_name"]
    info = dstack.wait_status(root, run, {"FAILED", "DONE", "STOPPED", "ABORTED"}, timeout=60)
    logs = dstack("logs", run, cwd=root).stdout
    assert info["status"] == "FAILED", (info, logs[-2000:])
    assert "it lacks node python3.11 npm make c++ pkg-config rg." in logs, logs[-2000:]
    assert "apt-get install nodejs npm g++ make pkg-config libkrb5-dev ripgrep python3-venv" in logs


def test_code_jobs():
    spec = CodeSpec.model_validate({"name": "c", "provider": "code", "python": 3.1, "requirements": "req.txt",
                                    "setup": ["echo first"], "env": {"A": "1"}})
    job = CodeProvider().create_jobs(spec, {})[0]
    assert job.cache == [INSTALL_ROOT]  # kept on the runner between runs
    assert job.ports == 1 and "PASSWORD" not in job.env and job.env["A"] == "1"  # made in the job: the API never shows it
    assert job.commands[0] == "echo first"  # setup runs first: it may install what code-server needs
    assert job.commands[1].startswith(f"cs_version={DEFAULT_VERSION}; cs_dir=\"$HOME/.cache/dstack/code-server/")
    assert any(c.startswith("python3.10 -m venv") for c in job.commands)
    assert any("-r req.txt" in c for c in job.commands) and any("secrets.token_hex(24)" in c for c in job.commands)
    assert job.commands[-1].startswith('exec "$cs_dir/bin/code-server" --bind-addr "0.0.0.0:$PORT_0" --auth password')
    script = job_script(job.commands)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "api.github.com" not in script and "--auth none" not in script
    other = CodeProvider().create_jobs(CodeSpec.model_validate({"name": "c", "version": "4.99.4"}), {})[0]
    assert other.commands[0].startswith("cs_version=4.99.4;") and "python3 -m venv" in "\n".join(other.commands)
    for bad in ({"version": 4.1}, {"version": "latest"}, {"commands": ["x"]}, {"python": 2.7}):
        with pytest.raises(ValueError):
            CodeSpec.model_validate({"name": "c", "provider": "code", **bad})
