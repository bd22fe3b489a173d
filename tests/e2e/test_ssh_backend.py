"""The `ssh` backend end to end: Debian's sshd on a test host (a network namespace, tests/sshd.py) with a key pair
made by the test, a real server on the test bridge, and the CLI.

What it shows: `backends add ssh` accepts the host key on first use (its fingerprint printed) and sees the host's
resources; a queued job makes the server install its own dstack from its wheels on the host and start a runner
there (over SSH, detached: it outlives the SSH session), which runs a job with an artifact and then a job that
depends on it; the runner stops after its idle timeout; a host cut off the network is reported in `dstack
backends`; the private key is in no file, log line or API answer; `backends remove` leaves no process and no file
of ours on the host (checked over SSH), the user's own files in its folder kept, and its name is taken until then;
a host key that changed is refused."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest

from tests.dstack_server import Server
from tests.e2e.conftest import Dstack, eventually
from tests.sshd import sshd  # noqa: F401

WORKFLOWS = """\
workflows:
  - name: make
    commands:
      - mkdir -p out
      - echo made on $(hostname -I) > out/result.txt
    artifacts: [out]
  - name: use
    dependencies: [make]
    commands:
      - cat out/result.txt
"""




@pytest.fixture
def host_dir():
    d = Path(f"/tmp/dstack-ssh-host-{uuid.uuid4().hex[:8]}")  # the host's filesystem is this machine's
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_ssh_backend_end_to_end(tmp_path, hosts, sshd, host_dir):  # noqa: F811
    server = Server(tmp_path / "home", host=hosts.address)
    d = Dstack(tmp_path / "client")
    d.env.update({"DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
    proj = tmp_path / "proj"
    (proj / ".dstack").mkdir(parents=True)
    (proj / ".dstack" / "workflows.yaml").write_text(WORKFLOWS)
    # a pattern that matches the host's processes of ours, not the shell that runs pgrep over SSH
    ours = f"'{str(host_dir)[:-1]}[{str(host_dir)[-1]}]'"
    try:
        target = f"root@{sshd.host}"
        # a key that is not the host's: refused, and nothing is kept
        (tmp_path / "wrong").write_text("not a key\n")
        bad = d("backends", "add", "ssh", "--set", f"hosts={target}", "--secret-file", f"private_key={tmp_path / 'wrong'}",
                cwd=proj)
        assert bad.returncode != 0 and "is not a private key" in bad.stderr and "Traceback" not in bad.stderr

        added = d("backends", "add", "ssh", "--set", f"hosts={target}", "--set", f"dir={host_dir}",
                  "--secret-file", f"private_key={sshd.private_key}", cwd=proj, check=True).stdout
        assert "accepted on first use" in added and "SHA256:" in added and " CPU" in added, added
        d("limits", "set", "ssh", "--idle-timeout", "5", cwd=proj, check=True)

        made = d("run", "make", cwd=proj)
        assert made.returncode == 0, made.stdout + made.stderr + server.log_text()
        assert "DONE" in made.stderr, made.stderr
        used = d("run", "use", cwd=proj)
        assert used.returncode == 0 and f"made on {sshd.host}" in used.stdout + used.stderr, used.stdout + used.stderr
        runners = json.loads(d("runners", "--json", cwd=proj, check=True).stdout)
        assert [r["backend"] for r in runners] == ["ssh"], runners
        # the runner outlives the SSH sessions; after its idle timeout it exits, and its instance is gone
        assert sshd.exec(f"pgrep -f {ours}/runner.sh").returncode == 0
        eventually(lambda: sshd.exec(f"pgrep -f {ours}/runner.sh").returncode == 1, 60,
                    "the runner did not stop after its idle timeout")
        eventually(lambda: json.loads(d("backends", "--json", cwd=proj, check=True).stdout)[-1]["instances"] == 0,
                    30, "the instance is still counted")
        assert (host_dir / "venv" / "bin" / "dstack-runner").exists()  # kept for the next start

        # cut off: said in `dstack backends`, and a job waits saying why
        sshd.test_host.cut()
        try:
            eventually(lambda: "cannot connect" in (json.loads(d("backends", "--json", cwd=proj, check=True)
                                                                .stdout)[-1].get("note") or ""), 40,
                        lambda: d("backends", cwd=proj).stdout)
        finally:
            sshd.test_host.heal()

        # the private key is nowhere the server writes, nor in any answer
        secret = sshd.private_key_text.strip().splitlines()[1]
        for f in (tmp_path / "home").rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
        assert secret not in server.log_text()
        assert secret not in d("backends", "--json", cwd=proj, check=True).stdout

        # removed while the host is cut off: its name is not free until what it installed is gone (asked again
        # until the host answers); then no process and no file of ours is left, and the user's files are
        (host_dir / "mine.txt").write_text("the user's\n")
        sshd.test_host.cut()
        try:
            assert d("backends", "remove", "ssh", cwd=proj).returncode == 0
            time.sleep(3)
            again = d("backends", "add", "ssh", "--set", f"hosts={target}", "--secret-file",
                      f"private_key={sshd.private_key}", cwd=proj)
            assert again.returncode != 0 and "is being removed" in again.stderr, again.stdout + again.stderr
        finally:
            sshd.test_host.heal()
        eventually(lambda: sshd.exec(f"ls -A {host_dir}").stdout.split() == ["mine.txt"], 90,
                    lambda: sshd.exec(f"ls -la {host_dir}").stdout)
        assert sshd.exec(f"pgrep -af {ours}").returncode == 1
        assert not (tmp_path / "home" / "server" / "ssh" / "ssh.known_hosts").exists()

        # a host key that changed is refused
        d("backends", "add", "ssh", "--name", "again", "--set", f"hosts={target}", "--set", f"dir={host_dir}",
          "--secret-file", f"private_key={sshd.private_key}", cwd=proj, check=True)
        sshd.change_host_key()
        tested = d("backends", "test", "again", cwd=proj)
        assert tested.returncode != 0 and "host key changed" in tested.stderr, tested.stdout + tested.stderr
        assert "Traceback" not in tested.stderr
    finally:
        server.stop()
