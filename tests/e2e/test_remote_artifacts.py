"""Artifacts across machines (issue 14, point 2), with runners on test hosts of their own (network namespaces,
tests/netns.py) that run as `nobody`, with a clean environment: they reach the server only over the network,
cannot read its disk, and hold no cloud credentials. `prepare` saves on h1, `train` mounts on h2."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dstack.core.sizes import human_size
from tests import readable
from tests.dstack_server import Server
from tests.e2e.conftest import Dstack
from tests.netns import Host

SYSTEM_PYTHON = Path("/usr/bin/python3.11")
BIG = 100_000_000
TOOL = len("#!/bin/sh\necho tool ran\n")

pytestmark = pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs Debian's python3.11 (runners as nobody)")


def workflows(big: int) -> str:
    return f"""\
workflows:
  - name: prepare
    commands:
      - mkdir -p data
      - printf '#!/bin/sh\\necho tool ran\\n' > data/tool.sh
      - chmod +x data/tool.sh
      - head -c {big} /dev/urandom > data/big.bin
    artifacts: [data]
  - name: train
    commands:
      - test -x data/tool.sh && data/tool.sh
      - wc -c < data/big.bin
    dependencies: [prepare]
"""


class RemoteRunner:
    """`dstack-runner start` inside a test host, as nobody, with a folder of its own and no other environment."""

    def __init__(self, host: Host, url: str, token: str):
        self.folder = Path(tempfile.mkdtemp(prefix=f"dstack-{host.name}-"))
        nobody = pwd.getpwnam("nobody")
        os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
        self.log_file = self.folder / "runner.log"
        argv = ["runuser", "-u", "nobody", "--", "env", "-i", "PATH=/usr/bin:/bin", f"HOME={self.folder}",
                f"PYTHONPATH={readable.for_user('nobody').pythonpath}", str(SYSTEM_PYTHON), "-m",
                "dstack.runner.main", "start",
                "--server", url, "--token", token, "--no-docker", "--workdir", str(self.folder / "runner"),
                "--cache-size", "1GB"]
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(host.run(argv), stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_registered(self, server: Server, name: str) -> None:
        deadline = time.monotonic() + 60
        while name not in {r["name"] for r in server.check(server.admin.get("/api/runners"))}:
            assert time.monotonic() < deadline and self.proc.poll() is None, f"no runner {name}: {self.log()}"
            time.sleep(0.2)

    def partial_downloads(self) -> list[Path]:
        return list((self.folder / "runner" / "blobs").glob("*/.*.part"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def remote(tmp_path):
    """start(host, url, token) -> RemoteRunner; all stopped and removed at the end."""
    started: list[RemoteRunner] = []

    def start(host: Host, url: str, token: str) -> RemoteRunner:
        r = RemoteRunner(host, url, token)
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


def cli(server: Server, tmp_path: Path) -> Dstack:
    client = Dstack(tmp_path / "client-home")
    client.env.update({"DSTACK_SERVER_URL": server.url, "DSTACK_TOKEN": server.token})
    return client


def token(server: Server, name: str) -> str:
    return server.check(server.admin.post("/api/runners/tokens", json={"name": name}))["token"]


def test_an_artifact_saved_on_one_host_is_mounted_on_another_through_the_server(hosts, remote, tmp_path, project):  # noqa: F811
    h1, h2 = hosts.add("h1"), hosts.add("h2")
    server = Server(tmp_path / "server-home", host=hosts.address)
    try:
        client, root = cli(server, tmp_path), project(workflows(BIG))
        # the runners' user cannot read the server's disk
        assert subprocess.run(["runuser", "-u", "nobody", "--", "test", "-r", str(server.home / "storage")]
                              ).returncode != 0

        r1 = remote(h1, server.url, token(server, "h1"))
        r1.wait_registered(server, "h1")
        h1.shape("400mbit", outgoing=True)  # time to cut the upload halfway
        try:
            run = client.popen("run", "prepare", cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            uploads = server.home / "storage" / "tmp"
            deadline = time.monotonic() + 120
            while not any(p.stat().st_size > 20_000_000 for p in uploads.glob("*.upload")):
                assert time.monotonic() < deadline and run.poll() is None, r1.log()
                time.sleep(0.05)
            h1.kill_connections(hosts.address)
            out, err = run.communicate(timeout=300)
        finally:
            h1.unshape()
        assert run.returncode == 0, (out, err, r1.log())
        r1.stop()
        log = r1.log()
        assert "artifact store: through the server" in log and "upload of a file broke off" in log, log
        # nothing twice: the bytes uploaded are the artifact's
        assert f"artifacts saved: uploaded 2 blobs ({human_size(BIG + TOOL)}, {BIG + TOOL} bytes)" in log, log

        r2 = remote(h2, server.url, token(server, "h2"))
        r2.wait_registered(server, "h2")
        h2.shape("400mbit")  # 100 MB take 2 s: time to cut the download halfway
        try:
            run = client.popen("run", "train", cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 120
            while not any(p.stat().st_size > 20_000_000 for p in r2.partial_downloads()):
                assert time.monotonic() < deadline and run.poll() is None, r2.log()
                time.sleep(0.05)
            h2.kill_connections(hosts.address)  # the cut: its TCP connections to the server are aborted
            out, err = run.communicate(timeout=300)
        finally:
            h2.unshape()
        assert run.returncode == 0, (out, err, r2.log())
        assert out.split() == ["tool", "ran", str(BIG)]  # mounted on h2, executable bit kept
        log = r2.log()
        assert "broke off at" in log, log
        # nothing twice: the bytes downloaded are the artifact's
        assert f"dependencies ready: downloaded 2 blobs ({human_size(BIG + TOOL)}, {BIG + TOOL} bytes)" in log, log
        jobs = [j for run in json.loads(client("status", "--all", "--json", cwd=root, check=True).stdout)
                for j in run["jobs"]]
        assert sorted(j["runner"] for j in jobs) == ["h1", "h2"]

        # the same dependency again on h2: nothing downloaded
        again = client("run", "train", cwd=root, check=True, timeout=120)
        assert again.stdout.split() == ["tool", "ran", str(BIG)]
        assert r2.log().count("downloaded 0 blobs (0 B, 0 bytes)") == 1, r2.log()
    finally:
        server.stop()


def _moto(address: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind((address, 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", address, "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://{address}:{port}"
    deadline = time.monotonic() + 30
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto did not start: {(tmp_path / 'moto.log').read_text()}")
            time.sleep(0.1)


@pytest.mark.parametrize("reachable", [True, False], ids=["presigned", "s3-out-of-reach"])
def test_runners_without_cloud_credentials_save_and_mount_artifacts_in_s3(hosts, remote, tmp_path, project,  # noqa: F811
                                                                          reachable):
    """With an S3 store, runners move blobs by presigned URLs the server hands out (a blob over 64 MiB goes in
    parts); where they cannot reach S3 (moto on the server's loopback), through the server."""
    import boto3

    h1, h2 = hosts.add("h1"), hosts.add("h2")
    moto, endpoint = _moto(hosts.address if reachable else "127.0.0.1", tmp_path)
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = f"dstack-{os.urandom(4).hex()}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    s3.create_bucket(Bucket=bucket)
    big = 70 << 20
    server = Server(tmp_path / "server-home", host=hosts.address, env={
        **creds, "DSTACK_STORE_URL": f"s3://{bucket}/artifacts?region=us-east-1&endpoint_url={endpoint}"})
    try:
        client, root = cli(server, tmp_path), project(workflows(big))
        r1 = remote(h1, server.url, token(server, "h1"))
        r1.wait_registered(server, "h1")
        made = client("run", "prepare", cwd=root, timeout=300)
        assert made.returncode == 0, (made.stdout, made.stderr, r1.log(), server.log_text())
        r1.stop()
        r2 = remote(h2, server.url, token(server, "h2"))
        r2.wait_registered(server, "h2")
        out = client("run", "train", cwd=root, check=True, timeout=300).stdout
        assert out.split() == ["tool", "ran", str(big)]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="artifacts/").get("Contents", [])]
        assert sum(k.startswith("artifacts/blobs/") for k in keys) == 2
        assert sum(k.startswith("artifacts/manifests/") for k in keys) == 1
        for r in (r1, r2):
            log = r.log()
            assert "presigned URLs of its S3 store" in log, log
            assert ("cannot reach the store's presigned URLs" in log) != reachable, log
        assert f"downloaded 2 blobs ({human_size(big + TOOL)}, {big + TOOL} bytes)" in r2.log()
        environ = _environ(r2.proc.pid)
        assert "PATH=/usr/bin:/bin" in environ and not any(k.startswith("AWS_") for k in environ)
    finally:
        server.stop()
        moto.terminate()
        moto.wait(10)


def _environ(pid: int) -> list[str]:
    """The environment of the runner under `runuser` (pid: runuser's), as /proc shows it to root."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = []
    for child in children.read_text().split() if children.exists() else []:
        try:
            found += Path(f"/proc/{child}/environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runuser)")
def test_test_hosts_say_why_they_cannot_be_made_without_root():
    paths = readable.for_user("nobody")  # our `tests` first: gpuhunt installs a top-level package of that name too
    p = subprocess.run(["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={paths.repo}:{paths.site}",
                        str(SYSTEM_PYTHON), "-c",
                        "from tests.netns import why_not; print(why_not())"], capture_output=True, text=True,
                       cwd="/", timeout=60)
    assert p.stdout.strip() == "test hosts (network namespaces) need root", p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns)")
def test_what_a_dead_test_run_left_is_removed():
    from tests.netns import remove_leftovers

    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = f"{dead.pid:x}"
    subprocess.run(["ip", "netns", "add", f"dstack-{tag}-h1"], check=True)
    subprocess.run(["ip", "link", "add", f"dsb{tag}", "type", "bridge"], check=True)
    removed = remove_leftovers()
    assert f"dstack-{tag}-h1" in removed and f"dsb{tag}" in removed
    assert f"dstack-{tag}-h1" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_two_node_run_across_hosts_reaches_itself_over_tcp(hosts, remote, tmp_path, project):  # noqa: F811
    """Issue 14, point 5, across machines: rank 0 on h1 and rank 1 on h2 (each asks for both CPUs of a host),
    the worker reaching the master at MASTER_ADDR:MASTER_PORT, h1's own address on the bridge."""
    from tests.e2e.test_multinode import PAIR

    h1, h2 = hosts.add("h1"), hosts.add("h2")
    server = Server(tmp_path / "server-home", host=hosts.address)
    try:
        client = cli(server, tmp_path)
        cpus = len(os.sched_getaffinity(0))
        root = project(f"""\
        workflows:
          - name: pair
            nodes: 2
            commands:
              - echo "rank $RANK on $JOB_HOSTNAME, master $MASTER_ADDR"
              - python3 pair.py
            resources:
              cpu: {cpus}
        """)
        (root / "pair.py").write_text(PAIR)
        for host in (h1, h2):
            remote(host, server.url, token(server, host.name)).wait_registered(server, host.name)
        r = client("run", "pair", cwd=root, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "master got: hello from rank 1" in r.stdout and "worker got: hello from rank 0" in r.stdout, r.stdout
        jobs = json.loads(client("status", "--all", "--json", cwd=root, check=True).stdout)[0]["jobs"]
        assert sorted(j["runner"] for j in jobs) == ["h1", "h2"], jobs
        master_host = next(j["runner"] for j in jobs if j["job_id"] == jobs[0]["job_id"])
        address = {"h1": h1.address, "h2": h2.address}[master_host]
        assert f"master {address}" in r.stdout and f"rank 0 on {address}" in r.stdout, r.stdout
    finally:
        server.stop()


def test_a_network_cut_of_30_s_loses_nothing_and_stop_reaches_a_remote_runner(hosts, remote, tmp_path, project):  # noqa: F811
    """Issue 14, point 4: h1's cable is out for 30 s while its job prints; the job goes on, its output waits
    on the runner and arrives whole, once, when the cable is back; then `dstack stop` reaches a job on h1."""
    h1 = hosts.add("h1")
    server = Server(tmp_path / "server-home", host=hosts.address)
    try:
        client = cli(server, tmp_path)
        root = project("""\
        workflows:
          - name: count
            commands:
              - for i in $(seq 1 90); do echo "line $i"; sleep 0.5; done
          - name: long
            commands: [sleep 300]
        """)
        r1 = remote(h1, server.url, token(server, "h1"))
        r1.wait_registered(server, "h1")
        client("run", "count", "-d", cwd=root, check=True)
        name = client.runs(root)[0]["run_name"]
        deadline = time.monotonic() + 30
        while "line 3" not in client("logs", name, cwd=root).stdout:
            assert time.monotonic() < deadline, r1.log()
            time.sleep(0.2)
        h1.cut()
        try:
            time.sleep(30)
            assert client.run_info(root, name)["status"] == "RUNNING"  # not given up for lost
        finally:
            h1.heal()
        info = client.wait_status(root, name, {"DONE", "FAILED"}, timeout=120)
        assert info["status"] == "DONE", (info, r1.log())
        out = client("logs", name, cwd=root, check=True).stdout
        assert out == "".join(f"line {i}\n" for i in range(1, 91)), out

        client("run", "long", "-d", cwd=root, check=True)
        name = client.runs(root)[0]["run_name"]
        client.wait_status(root, name, {"RUNNING"})
        started = time.monotonic()
        client("stop", name, "--abort", cwd=root, check=True)
        assert client.wait_status(root, name, {"ABORTED"}, timeout=10)["status"] == "ABORTED"
        assert time.monotonic() - started < 5
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns)")
def test_the_leftover_sweep_spares_the_hosts_of_a_live_run(hosts):  # noqa: F811
    """The index after a host's veth name is no part of the pid it carries: a sweep never takes a live
    run's veth for a dead run's (it once did, and cut every host of the run off)."""
    from tests.netns import remove_leftovers

    h = hosts.add("h1")
    remove_leftovers()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert h.veth in links
