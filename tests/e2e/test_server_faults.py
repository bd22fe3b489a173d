"""The core survives its own faults: the local server killed mid-job, a server that cannot write (its disk
full), a graceful stop, a stale pid, two servers for one DSTACK_HOME. Each test has a DSTACK_HOME (and so a
server and runners) of its own, and stops what it started."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import dstack
from tests.e2e.conftest import Dstack, gone, jobs_dir

COUNTER = """\
workflows:
  - name: count
    commands:
      - echo "start $JOB_ID" >> {starts}
      - for i in $(seq 1 {n}); do echo "line $i"; sleep {pause}; done
      - mkdir -p out && echo done > out/result.txt
    artifacts:
      - out
"""


def _server_pid(d: Dstack) -> int:
    return json.loads((d.home / "server" / "server.json").read_text())["pid"]


def _runner_pids(home: Path) -> list[int]:
    """Runner processes started for this DSTACK_HOME, found by their command line (not by our own records)."""
    out = subprocess.run(["pgrep", "-f", f"dstack.runner.main start .*--workdir {home}/runners/"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s")


def test_a_killed_local_server_loses_no_job(tmp_path, project, shared):
    """SIGKILL of the server mid-job: the attached `dstack run` brings it back at the same address and follows
    on; the runner kept the job's output and reports; every line arrives once, the artifact is saved, the
    job ran once, and no second runner was started for it."""
    d = Dstack(tmp_path / "home")
    starts = shared / "starts.txt"
    root = project(COUNTER.format(starts=starts, n=40, pause=0.1))
    try:
        attached = d.popen("run", "count", cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for(lambda: (d.home / "server" / "server.json").exists() and starts.exists(), 60, "the job starts")
        url = json.loads((d.home / "server" / "server.json").read_text())["url"]
        time.sleep(0.5)
        os.kill(_server_pid(d), signal.SIGKILL)
        time.sleep(2.0)  # the job goes on printing while no server runs
        out, err = attached.communicate(timeout=90)
        assert attached.returncode == 0, err.decode()
        # said, not silent: the first start, and the start again after the crash
        assert "[dstack: Starting the local dstack server in the background" in err.decode()
        assert "[dstack: Starting the local dstack server again (it ended without being stopped" in err.decode()
        lines = [ln for ln in out.decode().replace("\r\n", "\n").splitlines() if ln.startswith("line ")]
        assert lines == [f"line {i}" for i in range(1, 41)], out.decode()  # each once, in order
        assert json.loads((d.home / "server" / "server.json").read_text())["url"] == url  # the same address
        run = d.runs(root)[0]
        assert run["status"] == "DONE", run
        assert starts.read_text().count("start ") == 1  # never run twice
        logs = d("logs", run["run_name"], cwd=root, check=True).stdout.replace("\r\n", "\n")
        assert [ln for ln in logs.splitlines() if ln.startswith("line ")] == lines
        files = json.loads(d("artifacts", "list", run["run_name"], "--json", cwd=root, check=True).stdout)
        assert [a["path"] for a in files] == ["out"] and files[0]["files"] == 1
        assert len(_runner_pids(d.home)) == 1  # the runner that outlived the server, and no other
    finally:
        d.stop_server()
    assert not _runner_pids(d.home)


def test_server_stop_also_stops_the_runners_of_a_server_that_was_killed(tmp_path, project):
    d = Dstack(tmp_path / "home")
    root = project("workflows:\n  - name: a\n    commands: [echo a]\n")
    try:
        d("run", "a", cwd=root, check=True)
        assert _runner_pids(d.home)  # an idle local runner waits for the next job
        os.kill(_server_pid(d), signal.SIGKILL)
        time.sleep(0.3)
        r = d("server", "stop", "--force", cwd=root)
        assert r.returncode == 0, r.stderr
        _wait_for(lambda: not _runner_pids(d.home), 30, "the runner is stopped")
        assert d("server", "stop", cwd=root).stdout.strip() == "no local server is running"
    finally:
        for pid in _runner_pids(d.home):
            os.kill(pid, signal.SIGKILL)


def test_a_stale_pid_of_another_program_is_neither_used_nor_signalled(tmp_path, project):
    """server.json names a pid that now belongs to another process: commands start a server of their own,
    and `dstack server stop --force` never signals that process."""
    d = Dstack(tmp_path / "home")
    root = project("workflows:\n  - name: a\n    commands: [echo hello-stale]\n")
    other = subprocess.Popen(["sleep", "300"])
    try:
        sdir = d.home / "server"
        sdir.mkdir(parents=True)
        (sdir / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": other.pid,
                                                      "version": "0.3.0"}))
        (sdir / "token").write_text("not-the-token")
        r = d("run", "a", cwd=root)
        assert r.returncode == 0 and "hello-stale" in r.stdout, r.stderr
        assert _server_pid(d) != other.pid
        # the stale record again, now with our server running beside it
        d("server", "stop", "--force", cwd=root, check=True)
        (sdir / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": other.pid,
                                                      "version": "0.3.0"}))
        d("server", "stop", "--force", cwd=root, check=True)
        # a record of our own format, whose start time is not that process's
        (sdir / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": other.pid,
                                                      "started": 1, "version": dstack.__version__}))
        assert d("status", cwd=root).returncode == 0
        d("server", "stop", "--force", cwd=root, check=True)
        time.sleep(0.2)
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()
        d.stop_server()


def test_one_server_per_dstack_home(tmp_path):
    """Two server processes started at once for one DSTACK_HOME: one serves, the other says why it does not."""
    home = tmp_path / "home"
    env = {**os.environ, "DSTACK_HOME": str(home)}
    cmd = [sys.executable, "-m", "dstack.server.main", "--home", str(home)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        done = _wait_for(lambda: [p for p in procs if p.poll() is not None], 30, "one of them exits")
        assert len(done) == 1 and done[0].returncode == 1
        err = done[0].stderr.read().decode()
        assert "another dstack server already serves" in err, err
        serving = next(p for p in procs if p is not done[0])
        assert serving.poll() is None
        _wait_for(lambda: (home / "server" / "server.json").exists(), 30, "the other serves")
        assert json.loads((home / "server" / "server.json").read_text())["pid"] == serving.pid
        serving.send_signal(signal.SIGTERM)  # stopped as `dstack server stop` stops it: it tidies up
        assert serving.wait(30) == 128 + signal.SIGTERM
        assert not (home / "server" / "server.json").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)


def test_a_graceful_stop_leaves_an_idle_self_hosted_runner_waiting_and_no_runner_ready(tmp_path, project):
    """A foreground server stopped (SIGTERM) while a self-hosted runner long-polls for a job: the runner gets
    a clean answer and waits; the server started again at its port gives it the next job. A local runner
    stopped with its server is not listed READY afterwards. The self-hosted runner, started in a folder
    where a runner that was killed left a job folder, removes it."""
    home = tmp_path / "home"
    env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    port = _free_port()
    server_cmd = [sys.executable, "-m", "dstack.server.main", "--home", str(home), "--port", str(port)]
    server = subprocess.Popen(server_cmd, env=env, stderr=subprocess.DEVNULL)
    workdir = tmp_path / "runner"
    (jobs_dir(workdir) / "0123456789ab" / "code").mkdir(parents=True)  # left by a killed runner
    runner = None
    try:
        _wait_for(lambda: (home / "server" / "server.json").exists(), 30, "the server starts")
        token = (home / "server" / "token").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        log = open(tmp_path / "runner.log", "wb")
        runner = subprocess.Popen([sys.executable, "-m", "dstack.runner.main", "start", "--server", url,
                                   "--token", token, "--name", "selfie", "--workdir", str(workdir)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_for(lambda: b"registered as selfie" in (tmp_path / "runner.log").read_bytes(), 30, "it registers")
        assert not (jobs_dir(workdir) / "0123456789ab").exists()
        time.sleep(1.0)  # in its long poll now
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        time.sleep(2.0)
        assert runner.poll() is None, (tmp_path / "runner.log").read_text()
        text = (tmp_path / "runner.log").read_text()
        assert "answered 5" not in text and "Traceback" not in text, text
        server = subprocess.Popen(server_cmd, env=env, stderr=subprocess.DEVNULL)
        d = Dstack(home, env={"DSTACK_SERVER_URL": url, "DSTACK_TOKEN": token})
        d.env.update(DSTACK_SERVER_URL=url, DSTACK_TOKEN=token)
        root = project("workflows:\n  - name: a\n    commands: [echo back-again]\n")
        _wait_for(lambda: d("status", cwd=root).returncode == 0, 30, "the server is back")
        r = d("run", "a", cwd=root, timeout=60)
        assert r.returncode == 0 and "back-again" in r.stdout, r.stderr
        assert d.runs(root)[0]["jobs"][0]["runner"] == "selfie"
    finally:
        for p in (runner, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)


def test_local_runners_stopped_with_their_server_are_not_listed_ready(tmp_path, project):
    d = Dstack(tmp_path / "home")
    root = project("workflows:\n  - name: a\n    commands: [echo a]\n")
    try:
        d("run", "a", cwd=root, check=True)
        runner = d.runs(root)[0]["jobs"][0]["runner"]
        d("server", "stop", cwd=root, check=True)
        # as the stopped server left it (a server started now would tidy up on its own)
        with contextlib.closing(sqlite3.connect(d.home / "server" / "dstack.db")) as db:
            (status,) = db.execute("SELECT status FROM runners WHERE name = ?", (runner,)).fetchone()
        assert status == "TERMINATED"
        assert runner not in d("runners", cwd=root, check=True).stdout
    finally:
        d.stop_server()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs, mounted for the test and unmounted after it (root only, as CI runs)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)", pytrace=False)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    """A file that takes every free byte of `disk`."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_report_the_server_cannot_write_waits_and_lands_when_there_is_room(tmp_path, project, small_disk,
                                                                             shared):
    """The server's disk fills while a job runs: its end cannot be written (SQLite: disk full). The runner
    sends it again until it lands; meanwhile `dstack status` says why, naming the disk, and `dstack stop`
    returns within seconds; once there is room, the job is DONE with all its output."""
    d = Dstack(small_disk / "home", env={"DSTACK_STOP_GRACE": "2", "DSTACK_RUNNER_TIMEOUT": "3"})
    go = shared / "go"
    root = project(f"""\
        workflows:
          - name: waits
            commands:
              - echo before
              - while [ ! -e {go} ]; do sleep 0.1; done
              - echo after
        """)
    try:
        r = d("run", "waits", "-d", cwd=root, check=True)
        name = re.search(r"Run (\S+)", r.stderr).group(1)
        d.wait_status(root, name, {"RUNNING"})
        filler = _fill(small_disk)
        go.touch()
        let_go = datetime.now(UTC).replace(tzinfo=None)
        time.sleep(5.0)  # the job has ended; its report is refused, and so are heartbeats, past the runner timeout
        info = d.run_info(root, name)
        assert info["status"] not in ("DONE", "FAILED"), info
        reason = info["jobs"][0]["reason"] or ""
        assert "no space left" in reason and str(small_disk) in reason, info
        t = time.monotonic()
        d("stop", name, cwd=root, timeout=30)
        assert time.monotonic() - t < 15
        filler.unlink()
        info = d.wait_status(root, name, {"DONE"}, timeout=30)  # the retry has landed
        assert info["jobs"][0]["reason"] is None, info
        # it ended when it was let go, not when its report landed (seconds later)
        finished = datetime.fromisoformat(info["jobs"][0]["finished_at"]).replace(tzinfo=None)
        assert abs((finished - let_go).total_seconds()) < 2.0, (finished, let_go)
        logs = d("logs", name, cwd=root, check=True).stdout
        assert "before" in logs and "after" in logs
    finally:
        d.stop_server()


def test_a_runner_fetching_code_waits_for_a_server_that_is_not_back_yet(tmp_path):
    """The runner's download of a job's code goes through the same patient path as its reports: a server that
    is down (restarting) is waited for, a blob it answers is taken."""
    from dstack.api.client import Client
    from dstack.core.resources import RunnerResources
    from dstack.runner.client import ServerClient
    from dstack.runner.daemon import Runner

    home = tmp_path / "home"
    port = _free_port()
    env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    cmd = [sys.executable, "-m", "dstack.server.main", "--home", str(home), "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (home / "server" / "server.json").exists(), 30, "the server starts")
        token = (home / "server" / "token").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        blob = os.urandom(3 << 20)
        digest = hashlib.sha256(blob).hexdigest()
        Client(url, token).upload_code(digest, blob)
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        runner = Runner(ServerClient(url, token), RunnerResources(cpus=1, memory_mib=512, docker=False),
                        tmp_path / "runner")
        got: list[bytes] = []
        fetching = threading.Thread(target=lambda: got.append(runner._fetch_code(digest)), daemon=True)
        fetching.start()
        time.sleep(1.5)  # it tries and waits meanwhile
        assert fetching.is_alive() and not got
        server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)  # back at the same port
        fetching.join(30)
        assert got == [blob]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


def test_the_job_folder_of_a_killed_local_runner_is_removed_before_the_next_runner_starts(tmp_path, project):
    d = Dstack(tmp_path / "home", env={"DSTACK_RUNNER_TIMEOUT": "2"})
    root = project("workflows:\n  - name: long\n    commands: [sleep 60]\n  - name: quick\n    commands: [echo hi]\n")
    try:
        r = d("run", "long", "-d", cwd=root, check=True)
        name = re.search(r"Run (\S+)", r.stderr).group(1)
        info = d.wait_status(root, name, {"RUNNING"})
        runner, job_id = info["jobs"][0]["runner"], info["jobs"][0]["job_id"]
        left = jobs_dir(d.home / "runners" / runner) / job_id
        assert left.is_dir()
        for pid in _runner_pids(d.home):
            os.kill(pid, signal.SIGKILL)
        d.wait_status(root, name, {"FAILED"}, timeout=20)
        assert left.is_dir()  # nobody removed it yet
        r = d("run", "quick", cwd=root)  # a new runner is started for it
        assert r.returncode == 0 and "hi" in r.stdout, r.stderr
        assert not left.exists()
        assert (d.home / "runners" / runner / "runner.log").exists()  # its log is kept
    finally:
        d.stop_server()


def test_a_job_the_server_gave_up_on_is_killed_as_soon_as_its_runner_hears_of_it(tmp_path, project, shared):
    """The runner is frozen past the runner timeout (SIGSTOP): the server fails its job and may give the work
    to another. Once the runner runs again, it hears so and kills the job: it never runs on beside a retry."""
    d = Dstack(tmp_path / "home", env={"DSTACK_RUNNER_TIMEOUT": "2"})
    pidfile = shared / "job.pid"
    root = project(f"workflows:\n  - name: long\n    commands: ['echo $$ > {pidfile}; exec sleep 120']\n")
    runner_pid = None
    try:
        r = d("run", "long", "-d", cwd=root, check=True)
        name = re.search(r"Run (\S+)", r.stderr).group(1)
        d.wait_status(root, name, {"RUNNING"})
        job_pid = int(_wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "the job starts"))
        (runner_pid,) = _runner_pids(d.home)
        os.kill(runner_pid, signal.SIGSTOP)
        info = d.wait_status(root, name, {"FAILED"}, timeout=20)
        assert "stopped responding" in info["jobs"][0]["reason"]
        assert os.path.exists(f"/proc/{job_pid}")  # it runs on while its runner is frozen
        os.kill(runner_pid, signal.SIGCONT)
        _wait_for(lambda: gone(job_pid), 15, "the job is killed")
    finally:
        if runner_pid:
            os.kill(runner_pid, signal.SIGCONT)
        d.stop_server()


def test_a_runner_started_before_its_server_waits_for_it(tmp_path):
    home = tmp_path / "home"
    port = _free_port()
    env = {**os.environ, "DSTACK_HOME": str(home), "DSTACK_MAX_LOCAL_RUNNERS": "0"}
    log = tmp_path / "runner.log"
    runner = subprocess.Popen([sys.executable, "-m", "dstack.runner.main", "start", "--server",
                               f"http://127.0.0.1:{port}", "--token", "tok", "--name", "early",
                               "--workdir", str(tmp_path / "runner")],
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    server = None
    try:
        _wait_for(lambda: b"could not register" in log.read_bytes(), 30, "it tries")
        time.sleep(1.0)
        assert runner.poll() is None, log.read_text()
        server = subprocess.Popen([sys.executable, "-m", "dstack.server.main", "--home", str(home), "--port",
                                   str(port)], env={**env, "DSTACK_SERVER_TOKEN": "tok"}, stderr=subprocess.DEVNULL)
        _wait_for(lambda: b"registered as early" in log.read_bytes(), 30, "it registers once the server is up")
    finally:
        for p in (runner, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
