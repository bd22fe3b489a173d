"""The local backend keeps a spare runner process (`dstack-runner spare`: imports done, the machine looked at, no
token, no job): the first job that waits with no runner up gets it as its runner at once, and it ends with the
server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.e2e.conftest import Dstack, eventually


def _spares(home: Path) -> list[int]:
    """The spare processes whose environment names this DSTACK_HOME."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"spare" not in cmdline or b"dstack.runner.main" not in cmdline:
                continue
            if f"DSTACK_HOME={home}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found




def test_the_first_job_gets_the_spare_process_as_its_runner_and_it_ends_with_the_server(tmp_path, project):
    home = tmp_path / "home"
    d = Dstack(home)
    root = project("workflows:\n  - name: hello\n    commands: [echo hello]\n")
    try:
        d("status", cwd=root, check=True)  # the server starts; its spare follows a second later
        spare = eventually(lambda: _spares(home), 30, "a spare runner process is made", every=0.1)[0]
        assert "hello" in d("run", "hello", cwd=root, check=True).stdout
        (runner,) = json.loads(d("runners", "--json", cwd=root, check=True).stdout)
        record = json.loads((home / "runners" / runner["name"] / "runner.json").read_text())
        assert record["pid"] == spare  # the spare became the runner
        assert "registered as" in (home / "runners" / runner["name"] / "runner.log").read_text()
        eventually(lambda: [p for p in _spares(home) if p != spare], 30, "a new spare is made for the next one",
                   every=0.1)
    finally:
        d.stop_server()
    eventually(lambda: not _spares(home), 30, "no spare outlives its server", every=0.1)


def test_no_spare_when_told_not_to(tmp_path, project):
    home = tmp_path / "home"
    d = Dstack(home, env={"DSTACK_LOCAL_SPARE": "0"})
    root = project("workflows:\n  - name: hello\n    commands: [echo hello]\n")
    try:
        assert "hello" in d("run", "hello", cwd=root, check=True).stdout
        time.sleep(3)
        assert _spares(home) == []
    finally:
        d.stop_server()
