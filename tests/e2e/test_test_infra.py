"""The tests' real components themselves: the session's Slurm cluster (tests/slurm.py) runs a two-node job, and
an SSH server in a test host (tests/sshd.py) runs commands there and changes its host key when told."""

from __future__ import annotations

import shlex
import subprocess
import time


def test_slurm_runs_a_job_on_both_nodes(slurm, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm.run("sbatch", "--parsable", "-N2", "-o", str(out), "--wrap",
                    "srun -N2 bash -c 'echo $SLURMD_NODENAME'").stdout.strip().split(";")[0]
    slurm.wait_idle()
    assert slurm.job(job)["JobState"] == "COMPLETED"
    assert sorted(out.read_text().split()) == ["n1", "n2"]


def test_slurm_job_pends_on_resources_when_nodes_are_full(slurm):
    busy = slurm.run("sbatch", "--parsable", "-N2", "-c2", "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()
    waiting = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true").stdout.strip()
    for _ in range(100):
        if slurm.job(busy)["JobState"] == "RUNNING" and slurm.job(waiting)["Reason"] == "Resources":
            break
        time.sleep(0.1)
    assert slurm.job(busy)["JobState"] == "RUNNING"
    assert slurm.job(waiting)["JobState"] == "PENDING" and slurm.job(waiting)["Reason"] == "Resources"
    slurm.run("scancel", busy)  # the fixture cancels what is left; the waiting job may run first
    slurm.wait_idle()


def _keyscan(server) -> str:
    p = subprocess.run(["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(server.port), server.host],
                       capture_output=True, text=True, timeout=30)
    return " ".join(p.stdout.split()[1:3])  # "ssh-ed25519 AAAA..."


def test_sshd_runs_commands_in_its_host_and_changes_its_key(sshd):
    p = sshd.exec("echo hi; ip -4 -o addr show")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "hi"
    assert f"inet {sshd.host}/" in p.stdout
    before = _keyscan(sshd)
    assert before and before == " ".join(sshd.host_key_pub.split()[:2])
    sshd.change_host_key()
    after = _keyscan(sshd)
    assert after and after != before and after == " ".join(sshd.host_key_pub.split()[:2])
    assert sshd.exec("echo again").stdout == "again\n"


def test_sshd_jump_host(sshd):
    jump = sshd.start("jump")
    assert jump.host != sshd.host
    # the target reached through the jump host (each with its own key)
    p = subprocess.run([*sshd.ssh_argv("-o", f"ProxyCommand={shlex.join(jump.ssh_argv('-W', '%h:%p'))}"),
                        "hostname -I"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert sshd.host in p.stdout.split()
