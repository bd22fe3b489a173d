"""E2E fixtures: the installed `dstack` CLI driven as a user would, against a real local server and
real local runners (started by the CLI itself), in a DSTACK_HOME of the test session's own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.netns import hosts  # noqa: F401  (the fixture: one for the session, whichever module asks first)
from tests.slurm import slurm, slurm_cluster  # noqa: F401  (the session's Slurm cluster; `slurm`: per test)
from tests.sshd import sshd  # noqa: F401  (SSH servers in test hosts, per test)

BIN = Path(sys.executable).parent


class Dstack:
    def __init__(self, home: Path, env: dict[str, str] | None = None):
        self.home = home
        self.env = {**os.environ, "DSTACK_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
                    **(env or {})}
        self.env.pop("DSTACK_SERVER_URL", None)
        self.env.pop("DSTACK_TOKEN", None)

    def __call__(self, *args: str, cwd: Path, check: bool = False, timeout: float = 120,
                 input: str | None = None, binary: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([str(BIN / "dstack"), *args], cwd=cwd, env={**self.env, **(env or {})}, capture_output=True,
                           text=not binary, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"dstack {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def popen(self, *args: str, cwd: Path, **kw) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "dstack"), *args], cwd=cwd, env=self.env, **kw)

    def runs(self, cwd: Path) -> list[dict]:
        return json.loads(self("status", "--all", "--json", cwd=cwd, check=True).stdout)

    def run_info(self, cwd: Path, name: str) -> dict:
        return json.loads(self("status", name, "--json", cwd=cwd, check=True).stdout)

    def wait_status(self, cwd: Path, name: str, statuses: set[str], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.run_info(cwd, name)
            if info["status"] in statuses:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} is {info['status']} after {timeout}s, expected {statuses}")
            time.sleep(0.2)

    def stop_server(self) -> None:
        subprocess.run([str(BIN / "dstack"), "server", "stop", "--force"], env=self.env, capture_output=True,
                       timeout=60)


@pytest.fixture(scope="session")
def dstack(tmp_path_factory) -> Dstack:
    """One local server (and its runners) for the session's tests; each test has its own project."""
    d = Dstack(tmp_path_factory.mktemp("dstack-home"), env={"DSTACK_STOP_GRACE": "2"})
    yield d
    d.stop_server()


@pytest.fixture
def project(tmp_path) -> callable:
    """make(workflows, variables=None) -> a project folder with .dstack/ files."""

    def make(workflows: str, variables: str | None = None, name: str = "proj") -> Path:
        root = tmp_path / name
        (root / ".dstack").mkdir(parents=True, exist_ok=True)
        (root / ".dstack" / "workflows.yaml").write_text(textwrap.dedent(workflows))
        if variables is not None:
            (root / ".dstack" / "variables.yaml").write_text(textwrap.dedent(variables))
        return root

    return make


def last_run(d: Dstack, cwd: Path) -> dict:
    return d.runs(cwd)[0]


def jobs_dir(workdir: Path) -> Path:
    """Where a runner working in `workdir`, started as the tests' user without --job-user, makes its job folders
    (outside `workdir` when it runs as root: runner/job_user.py)."""
    from dstack.runner import job_user

    base = os.environ.get("DSTACK_JOBS_DIR")  # the tests' own (tests/conftest.py: jobs_base)
    users = job_user.choose(None)
    return job_user.jobs_dir(workdir, users.sample if users else None, Path(base) if base else None)


def log_match(d: Dstack, cwd: Path, run: str, pattern: str, within: float):
    """The first match of `pattern` in the run's log, once it is there (the run must not end first), and the log."""
    import re

    from dstack.core.status import JobStatus

    deadline = time.monotonic() + within
    while True:
        logs = d("logs", run, cwd=cwd).stdout
        found = re.search(pattern, logs)
        if found:
            return found, logs
        info = d.run_info(cwd, run)
        assert not JobStatus(info["status"]).finished, (info, logs[-3000:])
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(1)


def eventually(condition, within: float, what, every: float = 0.2):
    """condition()'s first true value within `within` s; else fails saying `what` (a text, or a function that
    says it then)."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within} s: {what() if callable(what) else what}"
        time.sleep(every)


def gone(pid: int) -> bool:
    """The process has ended: no such process, or a zombie that its new parent (init, once the process that
    started it exited) has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def server(tmp_path):
    """A server in the foreground (no local runners), and a client of it with the admin's token: (url, client)."""
    home = tmp_path / "server-home"
    env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    proc = subprocess.Popen([str(BIN / "dstack"), "server", "--port", "0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        info = home / "server" / "server.json"
        deadline = time.monotonic() + 30
        while not info.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.1)
        url = json.loads(info.read_text())["url"]
        client = Dstack(tmp_path / "client-home")
        client.env.update({"DSTACK_SERVER_URL": url, "DSTACK_TOKEN": (home / "server" / "token").read_text().strip()})
        yield url, client
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def add_runner(client: Dstack, cwd: Path, *args: str) -> dict:
    """`dstack runners add --json ARGS`: {name, token, labels}."""
    return json.loads(client("runners", "add", "--json", *args, cwd=cwd, check=True).stdout)
