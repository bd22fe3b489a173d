"""Local state is private: after a real run through the CLI, another user (nobody) can read none of
DSTACK_HOME: the database (with the run's variable values), the logs, the code blobs, the artifact store's
blobs, the token, the runners' folders. A DSTACK_HOME that an older dstack left open is tightened."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Dstack

WORKFLOWS = """\
workflows:
  - name: make
    commands:
      - echo "the secret is $secret"
      - mkdir -p out && echo "$secret" > out/secret.txt
    artifacts: [out]
"""


def _readable_by_nobody(paths: list[Path]) -> list[str]:
    """Those of `paths` that the user nobody can open (or list, for a folder)."""
    if os.geteuid() != 0:
        pytest.fail("acting as another user (setpriv --reuid) needs root; run the tests as root", pytrace=False)
    script = 'for p; do if [ -d "$p" ]; then ls "$p"; else cat "$p"; fi >/dev/null 2>&1 && echo "$p"; done; exit 0'
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script, "sh",
                        *map(str, paths)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.fixture
def open_folder():
    """A folder that every user may enter (pytest's own are 0700, which would hide any DSTACK_HOME in them)."""
    folder = Path(tempfile.mkdtemp(prefix="dstack-private-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_another_user_can_read_nothing_of_the_local_state(open_folder, project):
    root = project(WORKFLOWS, "variables:\n  make:\n    secret: none\n")
    (root / "train.py").write_text("print('code of the project')\n")
    d = Dstack(open_folder / "home")
    try:
        r = d("run", "make", "--secret", "s3cret", cwd=root, check=True)
        assert "the secret is s3cret" in r.stdout
    finally:
        d.stop_server()
    home = d.home
    state = {
        "database": [home / "server" / "dstack.db"],
        "token": [home / "server" / "token"],
        "logs": list((home / "server" / "logs").glob("*.log")),
        "code blobs": list((home / "server" / "code").iterdir()),
        "storage blobs": [p for p in (home / "storage" / "blobs").rglob("*") if p.is_file()],
        "runner folders": list((home / "runners").iterdir()),
    }
    for what, paths in state.items():
        assert paths, f"the run left no {what} to check"
    everything = [home, *(p for paths in state.values() for p in paths)]
    assert _readable_by_nobody(everything) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_an_open_home_of_an_older_dstack_is_tightened_on_start(open_folder, project):
    home = open_folder / "home"
    (home / "server").mkdir(parents=True)
    home.chmod(0o755)
    (home / "server" / "notes").write_text("left by an older dstack\n")
    (home / "server" / "notes").chmod(0o644)
    assert _readable_by_nobody([home / "server" / "notes"]) != []
    d = Dstack(home)
    try:
        d("status", cwd=project(WORKFLOWS), check=True)
    finally:
        d.stop_server()
    assert _readable_by_nobody([home, home / "server", home / "server" / "notes"]) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
