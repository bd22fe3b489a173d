"""The server's log of an ordinary session holds no warnings: a warning there means something to fix."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.e2e.conftest import Dstack

TOUR = Path(__file__).resolve().parents[2] / "examples" / "tour"
# python's warnings ("...: UserWarning: ..."), log records at WARNING or above, tracebacks
TROUBLE = re.compile(r"Warning\b|\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def test_a_session_of_the_tour_leaves_no_warning_in_the_server_log(tmp_path):
    root = tmp_path / "tour"
    shutil.copytree(TOUR, root)
    with open(root / ".dstack" / "workflows.yaml", "a") as f:  # a job long enough for runner heartbeats
        f.write("\n  - name: wait\n    commands:\n      - sleep 1.5\n")
    d = Dstack(tmp_path / "home")
    try:
        for args in (("run", "prepare", "-t", "latest"), ("run", "train"), ("run", "wait"), ("status",),
                     ("tags",)):
            d(*args, cwd=root, check=True)
    finally:
        d.stop_server()
    log = (d.home / "server" / "server.log").read_text(errors="replace")
    assert "listening on" in log  # it is the server's log
    trouble = [line for line in log.splitlines() if TROUBLE.search(line)]
    assert not trouble, "the server logged:\n" + "\n".join(trouble)
