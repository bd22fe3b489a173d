"""DSTACK_HOME is its owner's only: made so, tightened when an older dstack left it open; the server's umask
keeps what it writes private, and a job still gets the user's umask back."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from dstack.core.home import private_home


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_missing_home_is_made_private(tmp_path):
    home = tmp_path / "a" / "home"
    assert private_home(home) == home
    assert _mode(home) == 0o700


def test_an_open_home_of_an_older_dstack_is_tightened(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    (home / "server").mkdir()
    private_home(home)
    assert _mode(home) == 0o700


def test_the_home_comes_from_dstack_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "h"))
    private_home()
    assert _mode(tmp_path / "h") == 0o700


def test_the_servers_files_are_private_and_a_jobs_umask_is_the_users(tmp_path):
    code = ("import os, sys\n"
            "from dstack.core.home import private_umask, job_umask\n"
            "os.umask(0o022)\n"
            "assert private_umask() == 0o022\n"
            "open(sys.argv[1], 'w').close()\n"
            "os.environ.pop('DSTACK_HOME', None)\n"
            "print(oct(job_umask()))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True,
                       env={**os.environ, "DSTACK_JOB_UMASK": ""})
    assert r.returncode == 0, r.stderr
    assert _mode(tmp_path / "f") == 0o600
    assert r.stdout.strip() == "0o22"  # for the runners that the server starts: their jobs' files as before
