"""What the ssh and slurm backends say when something is wrong, against real sshd (tests/sshd.py) and Slurm
(tests/slurm.py): each error names what is wrong and how to fix it, and never quotes a secret."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from dstack.backends.base import BackendError, Bootstrap, CapacityError
from dstack.backends.slurm import SlurmBackend, _gpus
from dstack.backends.ssh import SSHBackend
from dstack.core.resources import Requirements
from dstack.runner.resources import slurm_allocation
from tests.e2e.conftest import Dstack
from tests.sshd import sshd  # noqa: F401


def _ssh(tmp_path: Path, server, **settings) -> SSHBackend:
    values = {"hosts": f"root@{server.host}", "private_key": server.private_key_text, "dir": str(tmp_path / "d")}
    return SSHBackend("s", {**values, **settings}, server_id="x", home=tmp_path / "home")


@pytest.mark.parametrize("settings, said", [
    ({"hosts": []}, "hosts"),
    ({"hosts": "a b a"}, "hosts are named twice: a"),
    ({"hosts": "root@a:notaport"}, "port"),
    ({"hosts": "a", "dir": "relative"}, "dir is an absolute path"),
    ({"hosts": "a", "dir": "~"}, "dir is"),
    ({"hosts": "a", "dir": "/x/../etc"}, "without '..'"),
    ({"hosts": "a", "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nnot it\n"}, "not a private key"),
    ({"hosts": "a", "colour": "red"}, "colour"),
])
def test_ssh_settings_that_are_wrong(tmp_path, settings, said):
    with pytest.raises(BackendError) as e:
        SSHBackend("s", settings, server_id="x", home=tmp_path)
    assert said in str(e.value) and "not it" not in str(e.value)


def test_ssh_hosts_that_do_not_work(tmp_path, sshd):  # noqa: F811
    # nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = SSHBackend("s", {"hosts": f"root@127.0.0.1:{port}"}, server_id="x", home=tmp_path)
    with pytest.raises(BackendError, match="cannot connect over SSH"):
        closed.test()

    # a key the host does not know
    other = tmp_path / "other"
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(BackendError, match="SSH refused the backend's private_key.*authorized_keys"):
        _ssh(tmp_path, sshd, private_key=other.read_text()).test()

    # no such python, and one too old
    with pytest.raises(BackendError, match="there is no nosuchpython3: the runner needs Python 3.11"):
        _ssh(tmp_path, sshd, python="nosuchpython3").test()
    old = tmp_path / "python3.8"
    old.write_text('#!/bin/sh\ncat > /dev/null\necho \'{"python": "3.8.10", "home": "/root", "dir": "/x"}\'\n')
    old.chmod(old.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(BackendError, match=r"its .*python3.8 is 3.8.10: the runner needs Python 3.11 or later"):
        _ssh(tmp_path, sshd, python=str(old)).test()

    # a host key never accepted: only adding or testing the backend accepts one
    fresh = _ssh(tmp_path / "fresh", sshd)
    fresh._probe_all()
    assert "was never accepted" in (fresh.note() or "") and fresh.offers() == []
    # accepted, then the key is another: refused, saying what to do
    fresh.test()
    assert fresh.offers() and fresh.ssh.known_hosts.stat().st_mode & 0o777 == 0o600
    sshd.change_host_key()
    fresh.ssh.close()
    with pytest.raises(BackendError, match="its host key changed .* remove its line"):
        fresh.test()


def test_backends_add_secret_file_errors(tmp_path):
    d = Dstack(tmp_path / "client")
    missing = d("backends", "add", "ssh", "--set", "hosts=a", "--secret-file", "private_key=/nonexistent/key",
                cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read /nonexistent/key" in missing.stderr, missing.stderr
    wrong = d("backends", "add", "ssh", "--set", "hosts=a", "--secret-file", "hosts=/etc/hostname", cwd=tmp_path)
    assert wrong.returncode == 2 and "private_key" in wrong.stderr, wrong.stderr
    d.stop_server()


@pytest.mark.parametrize("settings, said", [
    ({"partition": "a;rm -rf /"}, "letters, digits"),
    ({"sbatch_options": ["-N2"]}, "one long option of sbatch"),
    ({"sbatch_options": "--exclusive -w n1"}, "'-w'"),
    ({"time_limit": "an hour"}, "time_limit"),
    ({"dir": "rel/ative"}, "dir is an absolute path"),
])
def test_slurm_settings_that_are_wrong(tmp_path, settings, said):
    with pytest.raises(BackendError) as e:
        SlurmBackend("s", settings, server_id="x", home=tmp_path)
    assert said in str(e.value)


def test_slurm_refusals(tmp_path, slurm):
    backend = SlurmBackend("s", {"partition": slurm.partition, "dir": str(tmp_path / "d")}, server_id="x",
                           home=tmp_path)
    backend.test()
    offer = backend.offers()[0]
    boot = Bootstrap(server_url="http://127.0.0.1:9", token="t0ken", runner_name="r-1", idle_timeout=5,
                     requirements=Requirements(memory_mib=1_000_000))
    with pytest.raises(CapacityError, match="Slurm: Memory specification can not be satisfied; Batch job submission "
                                            "failed: Requested node configuration is not available"):
        backend.create(offer, boot)
    assert not list((tmp_path / "d" / "runners").glob("*.sh"))  # the scripts (their tokens) went with it
    assert backend.list() == []
    # a job that is long gone, or never was: terminated all the same
    assert backend.terminate("999999/r-1") is True
    nobody = SlurmBackend("s", {"partition": "nosuch"}, server_id="x", home=tmp_path)
    with pytest.raises(BackendError, match="nosuch"):
        nobody.test()


def test_slurm_gres_and_allocation_parsing():
    assert [g.name for g in _gpus("gpu:a100:2(S:0-1),gpu:v100:1,mps:100")] == ["a100", "a100", "v100"]
    assert [g.name for g in _gpus("gpu:4")] == ["gpu"] * 4 and _gpus("(null)") == []
    assert slurm_allocation({}) == (None, None)
    assert slurm_allocation({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "3", "SLURM_MEM_PER_NODE": "2048"}) == (3, 2048)
    assert slurm_allocation({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "2", "SLURM_MEM_PER_CPU": "100"}) == (2, 200)
    assert slurm_allocation({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "x"}) == (None, None)


def test_slurm_request_from_the_job_and_the_settings(tmp_path, slurm):
    """sbatch is asked for the job's resources and the backend's settings (time limit, extra options), and the
    allocation is gone once terminated."""
    backend = SlurmBackend("s", {"partition": slurm.partition, "dir": str(tmp_path / "d"), "time_limit": "0:10:00",
                                 "sbatch_options": "--nice=5"}, server_id="x", home=tmp_path)
    backend.test()
    boot = Bootstrap(server_url="http://127.0.0.1:9", token="t0ken", runner_name="r-2", idle_timeout=5,
                     requirements=Requirements(cpu=2, memory_mib=512))
    inst = backend.create(backend.offers()[0], boot)
    job = slurm.job(inst.id.split("/")[0])
    assert job["TimeLimit"] == "00:10:00" and job["Nice"] == "5", job
    assert job["NumCPUs"] == "2" and job.get("MinMemoryNode", job.get("mem")) in ("512M", None), job
    assert job["Comment"] == "dstack:x:s:r-2" and job["JobName"] == "dstack-r-2"
    assert [i.id for i in backend.list()] == [inst.id]
    assert backend.terminate(inst.id) is True
    assert backend.list() == [] and not (tmp_path / "d" / "s" / "r-2.sh").exists()
