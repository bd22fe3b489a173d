"""An on-demand runner from the server's own wheels (issue 15): the script of backends/bootstrap.py, run with sh on
another host (a network namespace, tests/netns.py) as root with a bare environment and Debian's python3.11, as a
cloud instance runs its user-data: it installs dstack from the server's wheels (no package index), the runner
registers and runs a job, leaves once idle, and the idle command runs; the token shows in no process's command line
or environment meanwhile. A second start reuses the venv."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dstack import __version__
from dstack.backends.base import Bootstrap
from dstack.backends.bootstrap import install_script
from dstack.core.status import FINISHED
from tests.dstack_server import Server
from tests.e2e.conftest import Dstack, add_runner

SYSTEM_PYTHON = Path("/usr/bin/python3.11")

WORKFLOWS = "workflows:\n  - name: where\n    commands: [cat /proc/net/fib_trie]\n"

pytestmark = pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs Debian's python3.11")


class ProcWatch(threading.Thread):
    """Reads every process's command line and environment, every 20 ms, for a secret: where it shows, and the
    command lines seen that contain `mark` (so that the test knows what it watched)."""

    def __init__(self, secret: str, mark: str):
        super().__init__(daemon=True)
        self.secret, self.mark = secret.encode(), mark.encode()
        self.shown: set[str] = set()
        self.seen: set[str] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if self.mark in cmdline:
                    self.seen.add(cmdline.replace(b"\0", b" ").decode(errors="replace"))
                for what, data in (("cmdline", cmdline), ("environ", environ)):
                    if self.secret in data:
                        self.shown.add(f"{what} of {pid}: {cmdline[:200]!r}")

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def test_a_runner_installed_from_the_servers_wheels_runs_a_job_and_leaves_when_idle(hosts, tmp_path,  # noqa: F811
                                                                                    jobs_base):
    host = hosts.add("boot")
    server = Server(tmp_path / "server-home", host=hosts.address)
    watch = boot = None
    try:
        client = Dstack(tmp_path / "client-home")
        client.env.update({"DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
        token = add_runner(client, tmp_path, "--name", "boot-1")["token"]  # as the server's backends will

        machine = tmp_path / "machine"  # the instance's disk
        venv, workdir, idle = machine / "opt" / "dstack", machine / "var" / "runner", machine / "idle"
        bootstrap = Bootstrap(server.url, token, "boot-1", idle_timeout=3, labels={"zone": "far"})
        user_data = tmp_path / "user-data"
        user_data.write_text(install_script(bootstrap, venv=str(venv), workdir=str(workdir), python=str(SYSTEM_PYTHON),
                                            on_idle=f"touch {idle}", backend="test"))
        user_data.chmod(0o700)
        bare = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"DSTACK_JOBS_DIR={jobs_base}"]
        log = Path(f"{workdir}.log")

        watch = ProcWatch(token, mark=str(venv))
        watch.start()
        started = time.monotonic()
        boot = subprocess.Popen(host.run([*bare, "sh", str(user_data)]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while "boot-1" not in {r["name"] for r in server.check(server.admin.get("/api/runners"))}:
            assert time.monotonic() < started + 90 and boot.poll() is None, (boot.poll(), log.read_text())
            time.sleep(0.1)
        took = time.monotonic() - started
        run = server.submit(WORKFLOWS, "where")
        while (info := server.check(server.admin.get(f"/api/runs/{run}", params={"repo_id": "transfers"})))[
                "status"] not in {s.value for s in FINISHED}:
            assert time.monotonic() < started + 120, info
            time.sleep(0.1)
        job = info["jobs"][0]
        assert (info["status"], job["runner"]) == ("DONE", "boot-1"), (info, log.read_text())
        out = server.admin.get(f"/api/jobs/{job['job_id']}/logs").text
        assert f"{host.address}\n" in out, out  # the job ran on the other host
        _, err = boot.communicate(timeout=30)  # idle: it leaves
        watch.stop()
        assert boot.returncode == 0, (err, log.read_text(), server.log_text())

        assert f"installed dstack {__version__} into {venv}" in err
        assert f"the runner exited (0); running: touch {idle}" in err and idle.exists()
        assert "registered as boot-1" in log.read_text() and "idle for 3.0s; exiting" in log.read_text()
        assert not Path(f"{workdir}.token").exists()
        assert oct(log.stat().st_mode & 0o777) == "0o600"
        listed = {r["name"]: r for r in server.check(server.admin.get("/api/runners", params={"all": True}))}
        assert listed["boot-1"]["labels"] == {"zone": "far"} and listed["boot-1"]["backend"] == "test"
        assert listed["boot-1"]["version"] == __version__
        # watched: pip installing, and the runner running, from the venv; the token in none of them, nor elsewhere
        assert any("--find-links" in c for c in watch.seen) and any("dstack-runner start" in c for c in watch.seen), \
            watch.seen
        assert not watch.shown, watch.shown

        # the instance again (a Slurm node on the same shared venv): nothing installed
        idle.unlink()
        token = server.check(server.admin.post("/api/runners/tokens", json={"name": "boot-2"}))["token"]
        user_data.write_text(install_script(Bootstrap(server.url, token, "boot-2", idle_timeout=0.5), venv=str(venv),
                                            workdir=str(workdir), python=str(SYSTEM_PYTHON), on_idle=f"touch {idle}"))
        again = subprocess.run(host.run([*bare, "sh", str(user_data)]), capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, (again.stderr, log.read_text())
        assert f"{venv} has dstack {__version__} already" in again.stderr and idle.exists()
        assert "registered as boot-2" in log.read_text()

        # knowing the server's wheel, a venv this script installed from it is used with no Python started; a venv
        # from another wheel is looked at by the installer again
        from dstack.backends.wheelhouse import dstack_wheel

        wheel = dstack_wheel(server.home)
        assert (venv / "dstack-wheel").read_text().strip() == wheel
        for name, given, checked in (("boot-3", wheel, False), ("boot-4", "dstack-0-py3-none-any.whl 00", True)):
            idle.unlink()
            token = server.check(server.admin.post("/api/runners/tokens", json={"name": name}))["token"]
            user_data.write_text(install_script(Bootstrap(server.url, token, name, idle_timeout=0.5), venv=str(venv),
                                                workdir=str(workdir), python="/nonexistent/python3" if not checked
                                                else str(SYSTEM_PYTHON), on_idle=f"touch {idle}", wheel=given))
            run = subprocess.run(host.run([*bare, "sh", str(user_data)]), capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and idle.exists(), (run.stderr, log.read_text())
            assert (f"{venv} has dstack {__version__} already" in run.stderr) is checked, run.stderr
            assert f"registered as {name}" in log.read_text()
        print(f"the runner registered {took:.1f}s after its script started")
    finally:
        if watch is not None:
            watch.stop()
        if boot is not None and boot.poll() is None:
            boot.terminate()  # the script passes it on to its runner
            try:
                boot.wait(timeout=30)
            except subprocess.TimeoutExpired:
                boot.kill()
                boot.wait()
        server.stop()
