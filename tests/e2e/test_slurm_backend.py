"""The `slurm` backend end to end: Debian's Slurm (tests/slurm.py: munged, slurmctld, slurmd n1 and n2 on this
machine), a real server, and the CLI.

What it shows: `backends add slurm` sees the partition's nodes; a queued job becomes a batch job whose runner
installs the server's dstack from its wheels into the backend's folder (once: later allocations reuse it) and runs
the job with an artifact; a 2-node run is one allocation of n1 and n2 whose jobs reach each other; a job whose
allocation pends on Resources says so, and `dstack stop` cancels that Slurm job; a running job stopped ends its
allocation; no Slurm job of ours is left after the idle timeout; `backends remove` removes the backend's folder."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from tests.dstack_server import Server
from tests.e2e.conftest import Dstack, eventually
from tests.e2e.test_multinode import PAIR

WORKFLOWS = """\
workflows:
  - name: make
    commands:
      - mkdir -p out && echo made > out/result.txt
    artifacts: [out]
  - name: pair
    nodes: 2
    commands:
      - echo "rank=$JOB_RANK"
      - python3 pair.py
  - name: long
    commands:
      - echo started
      - sleep 300
"""




@pytest.fixture
def cluster_dir():
    d = Path(f"/tmp/dstack-slurm-{uuid.uuid4().hex[:8]}")  # the cluster's "shared filesystem": this machine's
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ours(slurm) -> list[str]:
    """Our Slurm jobs alive: `id|state|reason|name`."""
    out = slurm.run("squeue", "-h", "-o", "%i|%T|%r|%j").stdout
    return [line for line in out.splitlines() if "|dstack-" in line]


def test_slurm_backend_end_to_end(tmp_path, slurm, cluster_dir):
    server = Server(tmp_path / "home")
    d = Dstack(tmp_path / "client")
    d.env.update({"DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
    proj = tmp_path / "proj"
    (proj / ".dstack").mkdir(parents=True)
    (proj / ".dstack" / "workflows.yaml").write_text(WORKFLOWS)
    (proj / "pair.py").write_text(PAIR)
    try:
        bad = d("backends", "add", "slurm", "--set", "partition=nosuch", "--set", f"dir={cluster_dir}", cwd=proj)
        assert bad.returncode != 0 and "nosuch" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        added = d("backends", "add", "slurm", "--set", f"partition={slurm.partition}", "--set", f"dir={cluster_dir}",
                  cwd=proj, check=True).stdout
        assert "slurm-wlm 22" in added and "partition debug: 2 nodes of 2 CPUs" in added, added

        # a job end to end, with an artifact
        made = d("run", "make", cwd=proj, timeout=180)
        assert made.returncode == 0 and "DONE" in made.stderr, made.stdout + made.stderr + server.log_text()
        assert "started slurm runner" in server.log_text() and "slurm: job " in server.log_text()
        assert (cluster_dir / "venv" / "bin" / "dstack-runner").exists()
        venv_made = (cluster_dir / "venv" / "dstack-wheel").stat().st_mtime

        # after its idle timeout (a few seconds on Slurm) the runner exits, and its allocation ends
        eventually(lambda: not _ours(slurm), 60, lambda: _ours(slurm))
        eventually(lambda: json.loads(d("backends", "--json", cwd=proj, check=True).stdout)[-1]["instances"] == 0,
                    30, "the instance is still counted")

        # two nodes, one allocation, jobs that reach each other
        pair = d("run", "pair", cwd=proj, timeout=180)
        assert pair.returncode == 0, pair.stdout + pair.stderr + server.log_text()
        assert "master got: hello from rank 1" in pair.stdout and "worker got: hello from rank 0" in pair.stdout
        assert re.search(r"slurm: job \d+ for runners \S+, \S+ ", server.log_text()), server.log_text()
        assert (cluster_dir / "venv" / "dstack-wheel").stat().st_mtime == venv_made  # installed once

        # a running job stopped: its allocation ends (the idle runner exits)
        long = json.loads(d("run", "long", "--json", cwd=proj, check=True).stdout)["run_name"]
        d.wait_status(proj, long, {"RUNNING"}, timeout=120)
        d("stop", long, cwd=proj, check=True)
        eventually(lambda: not _ours(slurm), 60, lambda: _ours(slurm))

        # the cluster full: the job says why it waits (Slurm's reason), and stopping it cancels its Slurm job
        blocker = slurm.run("sbatch", "--parsable", "-N2", "-c2", "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()
        waiting = json.loads(d("run", "make", "--json", cwd=proj, check=True).stdout)["run_name"]

        def reason() -> str:
            return d.run_info(proj, waiting)["jobs"][0].get("reason") or ""

        eventually(lambda: "Resources" in reason(), 60, reason)
        assert "provisioning slurm" in reason(), reason()
        assert len(_ours(slurm)) == 1 and "PENDING" in _ours(slurm)[0]
        # the pending runner's script holds its token (0600, in the backend's folder): it must die with the job
        script = next((cluster_dir / "slurm").glob("*.sh"))
        token = re.search(r"<<'DSTACK_TOKEN_END'.*?\n(.+?)\nDSTACK_TOKEN_END", script.read_text(), re.S).group(1)
        assert script.stat().st_mode & 0o077 == 0
        d("stop", waiting, cwd=proj, check=True)
        eventually(lambda: not _ours(slurm), 30, lambda: _ours(slurm))
        eventually(lambda: not script.exists(), 30, "the script of a runner that never started is left")
        import httpx

        refused = httpx.post(f"{server.url}/api/runners/register", headers={"Authorization": f"Bearer {token}"},
                             json={"hostname": "x", "resources": {"cpus": 1, "memory_mib": 1}})
        assert refused.status_code == 401, refused.text
        slurm.run("scancel", blocker)

        # removed: its folder goes from the shared filesystem
        assert d("backends", "remove", "slurm", cwd=proj).returncode == 0
        eventually(lambda: not cluster_dir.exists(), 60, lambda: list(cluster_dir.iterdir()))
        assert not _ours(slurm)
    finally:
        server.stop()


@pytest.fixture
def login_node(tmp_path, slurm):
    """An OpenSSH server on loopback in this machine's own namespace (where the cluster's daemons are): the
    cluster's login node, whose sessions get SLURM_CONF (sshd's SetEnv) as a real login node's profile would."""
    import socket
    import subprocess

    folder = tmp_path / "login"
    folder.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'client_key.pub'}\nPermitRootLogin prohibit-password\n"
        f"PasswordAuthentication no\nUsePAM no\nStrictModes no\nSetEnv SLURM_CONF={slurm.conf}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "w"))
    try:
        eventually(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10, "sshd did not listen")
        yield f"root@127.0.0.1:{port}", folder / "client_key"
    finally:
        sshd.kill()
        sshd.wait()


def test_slurm_through_a_login_node(tmp_path, slurm, login_node, cluster_dir):
    """The same backend with `login`: every Slurm command goes over SSH (the host key accepted on first use)."""
    login, key = login_node
    server = Server(tmp_path / "home", env={"SLURM_CONF": "/nonexistent"})  # the server itself has no cluster
    d = Dstack(tmp_path / "client")
    d.env.update({"DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
    proj = tmp_path / "proj"
    (proj / ".dstack").mkdir(parents=True)
    (proj / ".dstack" / "workflows.yaml").write_text(WORKFLOWS)
    try:
        added = d("backends", "add", "slurm", "--set", f"login={login}", "--secret-file", f"private_key={key}",
                  "--set", f"dir={cluster_dir}", cwd=proj, check=True).stdout
        assert "accepted on first use" in added and "partition debug: 2 nodes" in added, added
        made = d("run", "make", cwd=proj, timeout=180)
        assert made.returncode == 0 and "DONE" in made.stderr, made.stdout + made.stderr + server.log_text()
        eventually(lambda: not _ours(slurm), 60, lambda: _ours(slurm))
    finally:
        server.stop()
