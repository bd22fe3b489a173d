"""The server's own dstack as wheels (backends/wheelhouse.py): built from what is installed, once; installed into a
bare venv of Debian's python3.11 with no package index; served to the admin and to runners' tokens only, and only
the wheels of its index; the bootstrap script refuses a wheel that is not what the index says, and a Python
before 3.11."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from tests.dstack_server import Server

from dstack.backends import wheelhouse
from dstack.backends.base import Bootstrap
from dstack.backends.bootstrap import install_script

SYSTEM_PYTHON = Path("/usr/bin/python3.11")  # Debian's, not the one this venv was made with
OLD_PYTHON = Path("/root/.pyenv/versions/3.10.13/bin/python3.10")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, float]:
    """(the wheelhouse, seconds its build took), once for the module."""
    started = time.perf_counter()
    folder = wheelhouse.ensure(tmp_path_factory.mktemp("wheels"))
    return folder, time.perf_counter() - started


def test_the_wheelhouse_is_built_once_from_what_is_installed(built):
    folder, seconds = built
    assert seconds < 30, f"the first build took {seconds:.1f}s"
    index = json.loads((folder / "index.json").read_text())
    files = {e["file"]: e for e in index}
    assert set(files) == {p.name for p in folder.glob("*.whl")}
    for entry in index:
        data = (folder / entry["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), entry["file"]
    names = {f.split("-")[0] for f in files}
    assert {"dstack", "pip", "pydantic_core", "greenlet", "psycopg_binary", "typing_extensions"} <= names
    assert not names & {"pytest", "moto", "ruff", "hypothesis"}  # dstack's test extra is not followed
    from dstack import __version__

    assert f"dstack-{__version__}-py3-none-any.whl" in files
    with zipfile.ZipFile(folder / f"dstack-{__version__}-py3-none-any.whl") as zf:
        names_in = zf.namelist()
        info = f"dstack-{__version__}.dist-info"
        assert "dstack/runner/main.py" in names_in and f"{info}/entry_points.txt" in names_in
        assert not [n for n in names_in if "__pycache__" in n or n.endswith(".pyc")]
        assert names_in[-1] == f"{info}/RECORD" and "Root-Is-Purelib: true" in zf.read(f"{info}/WHEEL").decode()
        record = zf.read(f"{info}/RECORD").decode().splitlines()
        assert len(record) == len(names_in) and all(",sha256=" in line for line in record[:-1])

    # a second call: the same folder, nothing rebuilt
    before = (folder / "index.json").stat()
    started = time.perf_counter()
    assert wheelhouse.ensure(folder.parent) == folder
    assert time.perf_counter() - started < 1
    after = (folder / "index.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs Debian's python3.11")
def test_a_bare_venv_installs_the_runner_from_the_wheelhouse_alone(built, tmp_path):
    folder, _ = built
    venv, bare = tmp_path / "venv", {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # nothing of this checkout
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60, env=bare)
    pip = next(folder.glob("pip-*.whl"))
    p = subprocess.run([str(venv / "bin" / "python"), str(pip / "pip"), "install", "-q", "--no-index", "--find-links",
                        str(folder), "--no-cache-dir", "--disable-pip-version-check", "dstack"],
                       capture_output=True, text=True, timeout=180, env=bare)
    assert p.returncode == 0, p.stdout + p.stderr
    help_ = subprocess.run([str(venv / "bin" / "dstack-runner"), "--help"], capture_output=True, text=True, timeout=60,
                           env=bare)
    assert help_.returncode == 0 and "Run dstack jobs on this machine" in help_.stdout, help_.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import dstack; print(dstack.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=bare)
    assert where.stdout.startswith(str(venv)), where  # the venv's copy, not this checkout


def test_the_server_serves_its_wheels_to_the_admin_and_to_runners_only(built, tmp_path):
    folder, _ = built
    home = tmp_path / "server-home"
    # the module's build, as the server would find it (the same key): its first request costs no build here
    shutil.copytree(folder, home / "server" / "wheels" / folder.name, copy_function=os.link)
    server = Server(home)
    try:
        url = server.url
        assert httpx.get(f"{url}/api/wheels").status_code == 401
        assert httpx.get(f"{url}/api/wheels/{next(folder.glob('pip-*.whl')).name}").status_code == 401
        index = server.check(server.admin.get("/api/wheels"))
        assert index == json.loads((folder / "index.json").read_text())
        assert [p.name for p in (home / "server" / "wheels").iterdir()] == [folder.name]  # found, not rebuilt
        token = server.check(server.admin.post("/api/runners/tokens", json={"name": "w1"}))["token"]
        runner = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert runner.get("/api/wheels").json() == index
        dstack = next(e for e in index if e["file"].startswith("dstack-"))
        r = runner.get(f"/api/wheels/{dstack['file']}")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == dstack["sha256"]
        for name in ("index.json", "nothing.whl", "..%2Findex.json", "%2e%2e%2f%2e%2e%2fserver.json",
                     "..%2F..%2Ftoken"):
            assert runner.get(f"/api/wheels/{name}").status_code == 404, name
    finally:
        server.stop()


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs Debian's python3.11")
def test_the_bootstrap_script_refuses_an_altered_wheel_and_an_old_python(built, tmp_path):
    folder, _ = built
    home = tmp_path / "server-home"
    served = home / "server" / "wheels" / folder.name
    shutil.copytree(folder, served, copy_function=os.link)
    server = Server(home)
    try:
        token = server.check(server.admin.post("/api/runners/tokens", json={"name": "w2"}))["token"]
        server.check(server.admin.get("/api/wheels"))  # read: the server keeps the index it read
        altered = next(served.glob("six-*.whl"))
        data = altered.read_bytes()
        altered.unlink()  # a link to the module's build: that one stays as it was
        altered.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

        def bootstrap(python: Path) -> subprocess.CompletedProcess:
            script = tmp_path / "user-data"
            script.write_text(install_script(Bootstrap(server.url, token, "w2", 5), venv=str(tmp_path / "venv"),
                                             workdir=str(tmp_path / "w" / "runner"), python=str(python),
                                             on_idle=f"touch {tmp_path / 'idle'}"))
            return subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120,
                                  env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

        p = bootstrap(SYSTEM_PYTHON)
        assert p.returncode == 1, p.stderr
        assert f"error: {altered.name} from {server.url} has sha256 " in p.stderr, p.stderr
        assert "the download was altered or cut" in p.stderr and "dstack was not installed" in p.stderr
        log = (tmp_path / "w" / "runner.log").read_text()
        assert f"error: {altered.name} from" in log
        assert not (tmp_path / "venv").exists() and not (tmp_path / "idle").exists()
        assert not (tmp_path / "w" / "runner.token").exists()

        if OLD_PYTHON.exists():
            p = bootstrap(OLD_PYTHON)
            assert p.returncode == 1 and "is Python 3.10.13: the runner needs Python 3.11 or later" in p.stderr, p
            assert "needs Python 3.11 or later" in (tmp_path / "w" / "runner.log").read_text()
    finally:
        server.stop()
