"""A one-machine Slurm cluster of the test session's own, from Debian's `slurm-wlm` and `munge` packages
(scripts/test.sh installs them; no service is started): the recipe of shared/DESIGN.md, all in a scratch folder
/tmp/dstack-test-slurm-*:

    munged      as the user munge, its key, socket, pid and seed files in <scratch>/munge
    slurmctld   -D -f <scratch>/slurm.conf, on a free port of 127.0.0.1, its state in <scratch>/state
    slurmd      -D -N n1 and -D -N n2: two nodes (NodeAddr=127.0.0.1, a free port each, spool <scratch>/spool/%n),
                each declared CPUs=2 RealMemory=1024 (SlurmdParameters=config_overrides: a smaller machine is fine),
                DefMemPerCPU=256: four 1-CPU jobs (or one `-N2 -c2`) fill both nodes, and the next job pends on
                "Resources"
    partitions  `debug` (Default=YES, n1 and n2) and `one` (n1 only), MaxTime=UNLIMITED

The session's os.environ gets SLURM_CONF=<scratch>/slurm.conf (restored at the end), so that sbatch, squeue,
scancel, sinfo and scontrol run by the tests or by the code under test find this cluster; `env` holds it too.
MinJobAge=600 keeps finished jobs known to `scontrol show job`; KillWait=5 makes scancel quick.

Fixtures: `slurm_cluster` (session: started once, both nodes idle before it is yielded) and `slurm` (per test: the
same cluster, with no job left in it before and after the test, its nodes back to idle). In a module:
`from tests.slurm import slurm, slurm_cluster  # noqa: F401` (tests/e2e/conftest.py registers both). At the end:
`scontrol shutdown`, then what is left of its processes is killed and the folder removed; a folder that a killed
session left behind (its owner is gone) is cleaned the same way by the next session that starts a cluster."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import scratch

PREFIX = "dstack-test-slurm-"
NODES = ["n1", "n2"]
START_TIMEOUT = 30.0
KILL_WAIT = 5
MARK = "DSTACK_TEST_SLURM"  # in the daemons' environment: the folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(folder: Path) -> list[int]:
    """Processes whose command line names `folder`, whose environment has its mark (the daemons and their
    slurmstepd), or that are the cluster's jobs (SLURM_CONF of the folder and a SLURM_JOB_ID): not the tests' own
    programs, which have SLURM_CONF only."""
    cmdline, mark = str(folder).encode(), f"{MARK}={folder}\0".encode()
    conf, found = f"SLURM_CONF={folder}/slurm.conf\0".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if cmdline in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
                continue
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in environ or (conf in environ and b"\0SLURM_JOB_ID=" in environ):
            found.append(int(entry.name))
    return found


def _kill_all(folder: Path) -> None:
    for _ in range(20):
        pids = _processes_of(folder)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)


def sweep() -> None:
    """Stop and remove the clusters of test sessions that are gone (killed before their clean-up)."""
    scratch.sweep(PREFIX, _kill_all)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Slurm:
    """The cluster. `conf`: its slurm.conf (also SLURM_CONF in os.environ and in `env`); `partition`: the default
    partition, `partitions`: all; `nodes`: ["n1", "n2"]; `run(*argv)`: a Slurm command, checked."""

    def __init__(self) -> None:
        for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"Slurm needs `{tool}`: `apt-get install slurm-wlm munge` (scripts/test.sh does "
                                   "it; no service is started, the tests start a cluster of their own)")
        sweep()
        self.folder = scratch.owned_folder(PREFIX)
        self.folder.chmod(0o755)  # munged (user munge) goes through it
        self.conf = self.folder / "slurm.conf"
        self.partition, self.partitions, self.nodes = "debug", ["debug", "one"], list(NODES)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self) -> None:
        started = time.monotonic()
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_nodes(started + START_TIMEOUT)
        self.startup_s = time.monotonic() - started

    def _start_munge(self) -> None:
        munge = self.folder / "munge"
        munge.mkdir(mode=0o755)
        pw = pwd.getpwnam("munge") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (munge, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        self.munge_socket = munge / "munge.socket"
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                               f"--log-file={munge / 'munged.log'}"],
                    user=pw.pw_uid if os.geteuid() == 0 else None, group=pw.pw_gid)
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{_tail(self.logs[-1])}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        host, d = socket.gethostname().split(".")[0], self.folder
        for sub in ("state", *(f"spool/{n}" for n in self.nodes)):
            (d / sub).mkdir(parents=True)
        lines = [
            "ClusterName=dstacktest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory", "SchedulerParameters=batch_sched_delay=0", "DefMemPerCPU=256",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
            "SlurmdParameters=config_overrides", "MinJobAge=600", f"KillWait={KILL_WAIT}", "InactiveLimit=0", "Waittime=0",
        ]
        lines += [f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs=2 "
                  "RealMemory=1024 State=UNKNOWN" for n in self.nodes]
        lines += [f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=UNLIMITED State=UP",
                  f"PartitionName=one Nodes={self.nodes[0]} MaxTime=UNLIMITED State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str], **kw) -> None:
        log = self.folder / f"{name}.out"
        self.logs.append(log)
        with open(log, "ab") as out:
            self.procs.append(subprocess.Popen(argv, env={**self.env, MARK: str(self.folder)}, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True, **kw))

    def _daemon_logs(self) -> str:
        logs = [*self.logs, self.folder / "slurmctld.log", *(self.folder / f"slurmd-{n}.log" for n in self.nodes)]
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs if p.exists())

    def _wait_nodes(self, deadline: float) -> None:
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"Slurm did not start: {', '.join(dead)} exited\n{self._daemon_logs()}")
            states = self.node_states()
            if states and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm's nodes are not idle after {START_TIMEOUT:.0f} s ({states})\n{self._daemon_logs()}")

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm command (`run("sbatch", "--parsable", ...)`) against this cluster: its CompletedProcess (text)."""
        p = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def node_states(self) -> dict[str, str]:
        p = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=15)
        return dict(line.split()[:2] for line in p.stdout.splitlines() if len(line.split()) >= 2)

    def jobs(self) -> list[str]:
        """The ids of the jobs in squeue (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o`: its fields (JobState, Reason, NodeList...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no job is in squeue."""
        deadline = time.monotonic() + timeout
        while self.jobs():
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still in squeue after {timeout} s: {self.jobs()}")
            time.sleep(0.2)

    def reset(self) -> None:
        """No job left, both nodes idle (a test may have drained or downed one)."""
        if self.jobs():
            self.run("scancel", "--full", *self.jobs(), check=False)
            self.wait_idle(timeout=KILL_WAIT + 25)
        if any(state != "idle" for state in self.node_states().values()):
            self.run("scontrol", "update", f"NodeName={','.join(self.nodes)}", "State=RESUME", check=False)
            deadline = time.monotonic() + 15
            while any(s != "idle" for s in self.node_states().values()) and time.monotonic() < deadline:
                time.sleep(0.2)

    def stop(self) -> None:
        if self.procs:
            try:  # jobs' processes are slurmstepd's, which scontrol shutdown leaves running
                self.reset()
            except Exception:
                pass  # killed below
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        for p in self.procs:
            if p.args[0] == "munged":
                continue  # slurmctld and slurmd may still want it while they stop
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        _kill_all(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)



@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = Slurm()
    before = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """The session's cluster, with no job in it and its nodes idle, before and after the test."""
    slurm_cluster.reset()
    yield slurm_cluster
    slurm_cluster.reset()
