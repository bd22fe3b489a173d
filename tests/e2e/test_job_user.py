"""A runner that runs as root runs each host job as a user of its own (runner/job_user.py): the job cannot read
the server's token, its database or its runner's environment, while its code, its HOME, its dependencies and its
artifacts work as they do for a job of the runner's own user; nothing it leaves running outlives it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, Dstack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a runner runs jobs as another user only as root")

WORKFLOWS = """\
workflows:
  - name: peek
    commands:
      - id -un && id -u > {shared}/uid
      - setsid sh -c 'echo $$ > {shared}/left; exec sleep 300' < /dev/null > /dev/null 2>&1 &
      - while [ ! -s {shared}/left ]; do sleep 0.05; done
      - echo left > /tmp/dstack-left-$(id -u)
      - cat {token} > /dev/null 2>&1 && echo token-readable || echo token-unreadable
      - cat {db} > /dev/null 2>&1 && echo db-readable || echo db-unreadable
      - tr '\\0' '\\n' < /proc/$PPID/environ > /dev/null 2>&1 && echo environ-readable || echo environ-unreadable
      - echo "home=$HOME" && touch "$HOME/.cache-test" && echo home-writable
      - echo "path=$PATH"
      - mkdir -p out && echo data > out/data.txt && chmod +x out/data.txt && python3 tool.py
    artifacts: [out]
  - name: use
    deps: [peek]
    commands:
      - id -un
      - cat out/data.txt && test -x out/data.txt && echo still-executable
      - "{{ echo more > out/data.txt; }} 2>/dev/null && echo dependency-writable || echo dependency-read-only"
"""


@pytest.fixture
def open_home():
    """A DSTACK_HOME in a folder every user may enter (pytest's own are 0700, which would hide the server's files
    whatever their modes): the server's files must be private by their own modes."""
    folder = Path(tempfile.mkdtemp(prefix="dstack-job-user-"))
    folder.chmod(0o755)
    yield folder / "home"
    shutil.rmtree(folder, ignore_errors=True)


def test_a_root_runners_host_job_runs_as_a_user_of_its_own_and_reads_nothing_of_the_server(open_home, project,
                                                                                            shared):
    d = Dstack(open_home)
    root = project(WORKFLOWS.format(token=open_home / "server" / "token", db=open_home / "server" / "dstack.db",
                                    shared=shared))
    (root / "tool.py").write_text("import helper; helper.say()\n")  # an import beside the script: absolute paths
    (root / "helper.py").write_text("def say():\n    print('helper imported')\n")
    try:
        r = d("run", "peek", cwd=root, check=True)
        lines = r.stdout.splitlines()
        for expected in ("dstack-job", "token-unreadable", "db-unreadable", "environ-unreadable", "home-writable",
                         "helper imported"):
            assert expected in lines, r.stdout
        assert re.search(r"\[dstack: \S+ runs on the host of runner \S+ as a user of its own \(dstack-job\), who "
                         r"cannot read root's files "
                         r"\(a Python or conda under /root\); give the workflow an `image`, or run its jobs as a user "
                         r"who can \(`dstack-runner start --job-user USER`; for the local runner, DSTACK_JOB_USER=USER "
                         r"as its server starts: `dstack server stop` first\)\]",
                         r.stderr), r.stderr
        uid = int((shared / "uid").read_text())
        assert 1900000000 <= uid <= 1900065535, uid  # DSTACK_JOB_UIDS's default: no account's
        left = int((shared / "left").read_text())  # a process the job left behind (setsid) is gone with it
        assert not _alive(left), f"process {left} that the job left behind still runs"
        # once its folder is removed, after its final status
        assert _eventually(lambda: not Path(f"/tmp/dstack-left-{uid}").exists()), "what the uid left in /tmp goes"
        path = next(x for x in lines if x.startswith("path="))[5:].split(":")
        assert str(Path(sys.executable).parent) not in path and path, path  # not dstack's own environment's
        home = next(x for x in lines if x.startswith("home="))[5:]
        assert home != os.environ.get("HOME") and "/jobs/" in home, home
        used = d("run", "use", cwd=root, check=True)
        assert used.stdout.split() == ["dstack-job", "data", "still-executable", "dependency-read-only"], used.stdout
        jobs_dir = Path(home).parents[1]
        assert _eventually(lambda: list(jobs_dir.iterdir()) == []), "job folders are removed once their jobs end"
    finally:
        d.stop_server()


def _eventually(condition, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def test_a_job_user_that_does_not_exist_is_refused_at_start(tmp_path):
    r = subprocess.run([str(BIN / "dstack-runner"), "start", "--server",
                        "http://127.0.0.1:9", "--token", "x" * 43, "--job-user", "no-such-user", "--workdir",
                        str(tmp_path / "w")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert "no user 'no-such-user' on this machine (--job-user)" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_runner_told_to_run_jobs_as_root_does_and_the_run_says_so(tmp_path, project):
    d = Dstack(tmp_path / "home", env={"DSTACK_JOB_USER": "root"})  # the local runner inherits it
    root = project("workflows:\n  - name: who\n    commands: [id -un]\n")
    try:
        r = d("run", "who", cwd=root, check=True)
        assert r.stdout.split() == ["root"], r.stdout
        assert re.search(r"\[dstack: \S+ runs on the host of runner \S+ as root: its commands can change that "
                         r"machine", r.stderr), r.stderr
    finally:
        d.stop_server()


def test_a_jobs_dir_the_job_user_cannot_reach_is_refused_and_left_as_it_was(tmp_path):
    closed = tmp_path / "closed"  # pytest's folders are 0700: a job's user cannot pass through them
    r = subprocess.run([str(BIN / "dstack-runner"), "start", "--server", "http://127.0.0.1:9", "--token", "x" * 43,
                        "--jobs-dir", str(closed / "jobs"), "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert re.search(r"Invalid value for --jobs-dir: the job user 'dstack-job' cannot enter \S+ \(mode 700\), on the way "
                     r"to the jobs' folders \S+; choose another --jobs-dir", r.stderr), r.stderr
    assert not closed.exists() and "Traceback" not in r.stderr


def test_a_server_setting_that_is_no_number_is_said_so_not_a_traceback(tmp_path, project):
    root = project("workflows:\n  - name: who\n    commands: [id -un]\n")
    d = Dstack(tmp_path / "home", env={"DSTACK_RUNNER_TIMEOUT": "abc"})
    try:
        r = d("status", cwd=root)
        assert r.returncode != 0, r
        assert "DSTACK_RUNNER_TIMEOUT='abc' is not a number of seconds of at least 1" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        d.stop_server()


def test_a_local_runner_that_cannot_start_is_said_why_while_the_run_waits(tmp_path, project):
    d = Dstack(tmp_path / "home", env={"DSTACK_JOB_USER": "no-such-user"})
    root = project("workflows:\n  - name: who\n    commands: [id -un]\n")
    try:
        attached = d.popen("run", "who", cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = ""
        watchdog = threading.Timer(60, attached.kill)  # a run that never says why fails the test, never hangs it
        watchdog.start()
        try:
            for line in attached.stderr:  # until the run says why it waits (it would wait for ever)
                err += line
                if "waits for a runner that can run it:" in line:
                    break
        finally:
            watchdog.cancel()
            attached.terminate()
            attached.wait(timeout=30)
        assert re.search(r"\[dstack: \S+ waits for a runner that can run it: the local backend's runner \S+ exited "
                         r"before it registered .*no user 'no-such-user' on this machine", err, re.S), err
    finally:
        d("stop", "--all", cwd=root)
        d.stop_server()


@pytest.mark.parametrize(("args", "said"), [
    (["--server", "notaurl"], "Invalid value for --server: 'notaurl' is not the URL of a server: expected "
                              "http://HOST:PORT"),
    (["--server", "http://x:abc"], "Invalid value for --server: 'http://x:abc' is not a URL"),
    (["--server", "http://127.0.0.1:9", "--idle-timeout", "-5"], "Invalid value for '--idle-timeout': -5.0 is not in "
                                                                 "the range x>=0"),
    (["--server", "http://127.0.0.1:9", "--job-user", ""], "--job-user is empty: name a user of this machine"),
])
def test_bad_runner_options_are_refused_at_once(tmp_path, args, said):
    r = subprocess.run([str(BIN / "dstack-runner"), "start", "--token", "x" * 43, "--workdir", str(tmp_path / "w"),
                        *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and said in r.stderr, r
    assert "Traceback" not in r.stderr


def test_job_uids_are_leased_one_per_job_and_nothing_of_one_outlives_its_job(tmp_path):
    from dstack.runner.job_user import JobUserError, JobUsers

    leases = tmp_path / "uids"
    users, other_runner = (JobUsers(uids=range(1900070000, 1900070002), leases=leases) for _ in range(2))
    a, b = users.lease(), other_runner.lease()
    assert a.uid != b.uid and a.own and {a.uid, b.uid} == {1900070000, 1900070001}
    with pytest.raises(JobUserError, match=r"all 2 job uids \(DSTACK_JOB_UIDS\) are in use"):
        users.lease()
    # a process of the job's uid that left its group and made itself not dumpable (its /proc folder root's)
    hidden = subprocess.Popen(["/usr/bin/python3", "-c", "import ctypes, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
                               "time.sleep(300)"], user=a.uid, group=a.gid, extra_groups=[], start_new_session=True,
                              cwd="/")
    # and one whose leader thread exited alone (a zombie leader, its other thread running on)
    headless = subprocess.Popen(["/usr/bin/python3", "-c", "import ctypes, threading, time; threading.Thread("
                                 "target=time.sleep, args=(300,)).start(); ctypes.CDLL(None).syscall(60, 0)"],
                                user=a.uid, group=a.gid, extra_groups=[], start_new_session=True, cwd="/")
    try:
        assert _eventually(lambda: _state(headless.pid) == "Z")
        scratch = Path(f"/tmp/dstack-test-left-{a.uid}")
        scratch.mkdir()
        (scratch / "f").write_text("x")
        os.chown(scratch, a.uid, a.gid)
        users.end(a)
        assert hidden.wait(timeout=10) == -9
        assert headless.wait(timeout=10) == -9
        made = subprocess.run(["ipcmk", "-M", "4096"], user=a.uid, group=a.gid, extra_groups=[], cwd="/",
                              capture_output=True, text=True)  # System V shared memory, which outlives processes
        assert made.returncode == 0, made
        users.release(a)
        assert not scratch.exists(), "what the uid left in /tmp goes with its lease"
        assert not [x for x in Path("/proc/sysvipc/shm").read_text().splitlines()[1:] if str(a.uid) in x.split()]
        assert users.lease().uid == a.uid  # free again
    finally:
        hidden.kill()
        headless.kill()
        shutil.rmtree(f"/tmp/dstack-test-left-{a.uid}", ignore_errors=True)


@pytest.mark.parametrize(("uids", "said"), [
    ("abc", "Invalid value for DSTACK_JOB_UIDS: DSTACK_JOB_UIDS='abc' is not a range of uids: expected FIRST-LAST"),
    ("5-10", "DSTACK_JOB_UIDS='5-10': the uids must be from 1000 to"),
    ("0-70000", "DSTACK_JOB_UIDS='0-70000': the uids must be from 1000"),
    ("65534-65534", "DSTACK_JOB_UIDS='65534-65534': uid 65534 is the account 'nobody''s; choose uids that no account "
                    "has"),
])
def test_job_uids_that_are_no_range_or_an_accounts_are_refused_at_start(tmp_path, uids, said):
    r = subprocess.run([str(BIN / "dstack-runner"), "start", "--server", "http://127.0.0.1:9", "--token", "x" * 43,
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DSTACK_JOB_UIDS": uids})
    assert r.returncode == 2 and said in r.stderr, r
    assert "Traceback" not in r.stderr


HOSTILE = """\
workflows:
  - name: data
    commands: [mkdir -p out && echo x > out/x]
    artifacts: [out]
  - name: hostile
    deps: [data]
    env:
      BASH_ENV: {code}/evil.sh
      PATH: {code}/evilbin:/usr/bin:/bin
      HOME: "/x:/bin/sh\\nr00t::0:0::/root:/bin/sh\\nz:x:1:1::/"
    commands:
      - getent passwd r00t > /dev/null && echo r00t-added || echo no-r00t
      - "getent passwd dstack-job | cut -d: -f6"
      - cat out/x
"""


def test_a_jobs_environment_never_reaches_what_runs_as_root(open_home, project, shared):
    """The job's `env` (PATH, BASH_ENV, HOME) is the job's shell's, as its own user: nothing that root runs to
    set the job up (its mount namespace, its account) reads it."""
    d = Dstack(open_home)
    root = project("")
    (root / ".dstack" / "workflows.yaml").write_text(HOSTILE.replace("{code}", "."))
    evil = f"#!/bin/sh\nid -u >> {shared}/ran-as\n"
    (root / "evil.sh").write_text(evil)
    (root / "evilbin").mkdir()
    for tool in ("unshare", "mount", "setpriv", "bash", "sh", "env"):
        (root / "evilbin" / tool).write_text(evil + "exec /usr/bin/" + tool + ' "$@"\n')
        (root / "evilbin" / tool).chmod(0o755)
    try:
        d("run", "data", cwd=root, check=True)
        r = d("run", "hostile", cwd=root)
        assert "no-r00t" in r.stdout.split() and "x" in r.stdout.split(), r.stdout + r.stderr
        home = next(x for x in r.stdout.split() if x.startswith("/"))
        assert home.endswith("/home") and "/jobs/" in home, r.stdout  # the runner's HOME for it, not the job's
        ran = (shared / "ran-as").read_text().split() if (shared / "ran-as").exists() else []
        assert "0" not in ran, f"the job's environment ran code as root: {ran}"
    finally:
        d.stop_server()


def test_a_finished_jobs_tree_is_taken_back_so_that_no_other_uid_changes_it(tmp_path):
    from dstack.runner.job_user import take_back

    tree = tmp_path / "code"
    (tree / "out" / "deep").mkdir(parents=True)
    for d in (tree, tree / "out", tree / "out" / "deep"):
        os.chown(d, 1900070000, 1900070000)
        d.chmod(0o777)  # a job that let every uid in (another job of its own, still running)
    os.symlink("/etc", tree / "out" / "etc")  # not followed
    tmp_path.chmod(0o755)
    take_back(tree)
    for d in (tree, tree / "out", tree / "out" / "deep"):
        st = d.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755), (d, st)
    assert Path("/etc").stat().st_uid == 0 and Path("/etc").stat().st_mode & 0o777 == 0o755
    other = subprocess.run(["/bin/sh", "-c", f"touch {tree}/out/deep/new"], user=1900070001, group=1900070001,
                           extra_groups=[], capture_output=True)
    assert other.returncode != 0 and not (tree / "out" / "deep" / "new").exists()
