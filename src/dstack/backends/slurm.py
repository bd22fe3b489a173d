"""`slurm`: runners as jobs of an existing Slurm cluster, driven through its own commands (sbatch, squeue, scontrol,
scancel, sinfo), run on this machine or over SSH on a login node (`login`). No accounting is needed (no sacct).

A runner is a batch job (`sbatch --parsable`): its request is the waiting job's resources (`--cpus-per-task`,
`--mem`, `--gres=gpu[:type]:N`) and the backend's settings (partition, account, QoS, constraint, time limit, extra
options). Its script is the bootstrap script (bootstrap.py): the server's dstack from the wheels it serves, into
`dir/venv` on the cluster's shared filesystem (installed once, reused by every later allocation), then the runner,
which polls the server over HTTP from the compute node. A multi-node run is one allocation (`-N k`, one task per
node) whose `srun` starts one runner per node, so that Slurm places the nodes together; the runners of a run are
all or none. The job name is `dstack-<runner>`, the comment `dstack:<server id>:<backend>:<runners>` (what `list()` finds
again after a restart). A pending job's reason (Priority, Resources, QOSMaxJobsPerUserLimit) is the note that jobs
waiting for it show. An idle runner exits after a few seconds (`idle_timeout`, unless the limits say otherwise):
an allocation held idle costs the user's share of the cluster; a job stopped while its allocation pends cancels it.

Instance ids are `<Slurm job id>/<runner name>`."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator

from dstack.backends.base import (
    Allocations,
    BackendError,
    Bootstrap,
    CapacityError,
    Gpus,
    Instance,
    Offer,
    validated_settings,
)
from dstack.backends.ssh_client import Address, Connections, Result, first_command, remote_dir
from dstack.core.base import Model
from dstack.core.resources import Gpu, RunnerResources

log = logging.getLogger("dstack.server")
_NAME = re.compile(r"^[A-Za-z0-9_.,:=+-]*$")  # a partition's, an account's, a QoS's, a constraint's (no shell)
ALIVE = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED,REQUEUED,RESIZING"
# refusals at submission that another offer (partition) may not meet
CAPACITY = ("Requested node configuration is not available", "Job violates accounting/QOS policy",
            "QOSMaxSubmitJobPerUserLimit", "AssocMaxSubmitJobLimit", "Invalid generic resource")


class SlurmSettings(Model):
    """The keys of `dstack backends add slurm`."""

    model_config = {"extra": "forbid"}

    login: Address | None = None  # a login node, over SSH; none: this machine has the Slurm commands
    private_key: SecretStr | None = None
    proxy_jump: Address | None = None
    partition: str | None = Field(None, max_length=200)  # else the cluster's default
    account: str | None = Field(None, max_length=200)
    qos: str | None = Field(None, max_length=200)
    constraint: str | None = Field(None, max_length=500)
    time_limit: str | None = Field(None, pattern=r"^(\d+-)?\d+(:\d{2}){0,2}$|^UNLIMITED$")  # sbatch --time
    sbatch_options: list[str] = Field(default_factory=list, max_length=50)
    dir: str = Field("~/.dstack-slurm", min_length=1, max_length=500)  # on the shared filesystem
    python: str = Field("python3", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._/+-]+$")

    @field_validator("login", "proxy_jump", mode="before")
    @classmethod
    def _address(cls, value: Any) -> Any:
        from dstack.backends.ssh import _parse_host

        return _parse_host(value) if isinstance(value, str) else value

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("letters, digits and _.,:=+- only")
        return value

    @field_validator("sbatch_options", mode="before")
    @classmethod
    def _options(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = shlex.split(value)
        for option in value if isinstance(value, list) else []:
            if not isinstance(option, str) or not option.startswith("--") or "\n" in option:
                raise ValueError(f"{option!r}: each is one long option of sbatch, e.g. --exclusive or --nice=10")
        return value

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: str) -> str:
        return remote_dir(value)


class SlurmBackend(Allocations, Gpus):
    settings_model: ClassVar[type] = SlurmSettings
    secrets: ClassVar[tuple[str, ...]] = ("private_key",)
    max_runners = 1_000_000  # the cluster's scheduler and the limits (`dstack limits set`) bound it
    startup_grace = 24 * 3600.0  # an allocation may pend for hours: Slurm says why meanwhile
    list_interval = 3.0
    idle_timeout = 5.0
    cancels_unneeded = True

    def __init__(self, name: str, settings: dict[str, Any], *, server_id: str, home: Path) -> None:
        self.settings = validated_settings(SlurmSettings, name, settings)
        self.name, self.server_id, self.home = name, server_id, Path(home)
        s = self.settings
        self.ssh = None
        if s.login is not None:
            self.ssh = Connections(self.home / "server" / "ssh" / f"{name}.known_hosts",
                                   s.private_key.get_secret_value() if s.private_key else None, s.proxy_jump)
        self._lock = threading.Lock()
        self._offers: list[Offer] = []
        self._offers_at = float("-inf")
        self._nodes: dict[int, int] = {}  # id(offer) -> how many nodes have its shape
        self._home: str | None = None
        self._known: dict[str, Instance] = {}
        self._ending: set[str] = set()  # instances asked to terminate (a job's allocation goes with its last)

    def __repr__(self) -> str:
        return f"SlurmBackend(name={self.name!r}, login={self.settings.login.label() if self.settings.login else None})"

    # --- the backend interface

    def test(self) -> str:
        if self.ssh is not None:
            self.ssh.close()
            self.ssh.accepted.clear()
        version = self._run("sinfo --version", accept_new=True).check("sinfo --version").strip()
        self._refresh_offers()
        if not self._offers:
            raise BackendError(f"partition {self.settings.partition or '(the default)'} has no node that is up")
        nodes = self._nodes
        said = [version, "; ".join(f"partition {o.instance_type}: {nodes.get(id(o), 1)} node{'s' if nodes.get(id(o), 1) > 1 else ''}"
                                   f" of {o.resources.describe()}" for o in self._offers)]
        if self.ssh is not None and self.ssh.accepted:
            said.append("host keys accepted on first use: " + ", ".join(self.ssh.accepted))
        return "; ".join(said)

    def prepare(self) -> None:
        threading.Thread(target=self._quietly_refresh, name=f"slurm-offers-{self.name}", daemon=True).start()

    def offers(self) -> list[Offer]:
        return self._offers

    def create(self, offer: Offer, bootstrap: Bootstrap) -> Instance:
        return self.create_group(offer, [bootstrap])[0]

    def create_group(self, offer: Offer, bootstraps: list[Bootstrap]) -> list[Instance]:
        from dstack.backends.bootstrap import install_script
        from dstack.backends.wheelhouse import served_wheel

        d = self._dir()
        q = shlex.quote
        names = [b.runner_name for b in bootstraps]
        k = len(bootstraps)
        runners = self._runners(d)
        # each node's script (its runner's token in it: mode 0600, removed once sh has it open), then the batch
        # script that starts them, one per node
        scripts = []
        for b in bootstraps:
            text = install_script(b, venv=f"{d}/venv", workdir=f"{runners}/{b.runner_name}",
                                  python=self.settings.python, backend=self.name, wheel=served_wheel(self.home),
                                  self_removing=True)
            scripts.append((f"{runners}/{b.runner_name}.sh", text))
        req = bootstraps[0].requirements
        header = ["#!/bin/sh", f"#SBATCH --job-name=dstack-{names[0]}", f"#SBATCH --nodes={k}",
                  "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={runners}/{names[0]}.out", f"#SBATCH --chdir={runners}",
                  f"#SBATCH --comment={self._mark()}{','.join(names)}",
                  *(f"#SBATCH {o}" for o in self._request(req, offer))]
        pick = "".join(f"{i}) exec sh {q(path)} ;;\n" for i, (path, _) in enumerate(scripts))
        pick = f'case "$SLURM_PROCID" in\n{pick}esac\necho "no runner for task $SLURM_PROCID" >&2\nexit 1\n'
        body = ('PATH="${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"; export PATH\n'
                f"exec srun --export=ALL --kill-on-bad-exit=0 sh -c {q(pick)}\n")
        batch = "\n".join(header) + "\n" + body
        upload = "".join(f"cat > {q(path)} <<'DSTACK_SCRIPT_END'\n{text}DSTACK_SCRIPT_END\n" for path, text in scripts)
        command = (f"umask 077 && mkdir -p {q(runners)} || exit 1\n{upload}"
                   f"sbatch --parsable <<'DSTACK_BATCH_END'\n{batch}DSTACK_BATCH_END\n")
        r = self._run(command, timeout=60)
        if r.rc != 0:
            self._run(f"rm -f {' '.join(q(p) for p, _ in scripts)}")
            why = "; ".join(line.strip().removeprefix("sbatch: error: ") for line in (r.err or r.out).splitlines()
                            if line.strip())[-1000:]
            if any(c in why for c in CAPACITY):
                raise CapacityError(f"Slurm: {why}")
            raise BackendError(f"sbatch refused the runner's job: {why}")
        job = r.out.strip().split(";")[0].splitlines()[-1]
        made = [Instance(id=f"{job}/{n}", runner_name=n, started_at=time.monotonic(), offer=offer, note="PENDING")
                for n in names]
        with self._lock:
            self._known.update({i.id: i for i in made})
        log.info("slurm: job %s for runner%s %s (%s)", job, "s" if k > 1 else "", ", ".join(names), offer.describe())
        return made

    def terminate(self, instance_id: str) -> bool:
        """A multi-node run's allocation is cancelled once all its runners are to go: one runner that exits idle
        first must not end its neighbours' jobs."""
        job = instance_id.split("/", 1)[0]
        with self._lock:
            self._ending.add(instance_id)
            others = [i for i in self._known if i.split("/", 1)[0] == job and i not in self._ending]
        if others:
            return True
        try:
            self._run(f"scancel {shlex.quote(job)}")  # an unknown (long gone) job: an error, and gone all the same
            state = self._run(f"squeue -h -j {shlex.quote(job)} -t {ALIVE} -o %T").out.strip()
        except BackendError as e:
            log.warning("slurm: %s", e)
            return False
        if state in ("", "COMPLETING"):
            name = instance_id.split("/", 1)[-1]  # a script its runner never read holds its token: it goes
            self._run(f"rm -f {shlex.quote(self._runners(self._dir()))}/{shlex.quote(name)}.sh")
            return True
        return False

    def list(self) -> list[Instance]:
        if time.monotonic() - self._offers_at > 60:
            self._quietly_refresh()
        out = self._run(f"squeue -h -u \"$(id -un)\" -t {ALIVE} -o '%i|%T|%r|%k'").check("squeue")
        found = []
        mark = self._mark()
        for line in out.splitlines():
            job, state, reason, comment = (line.split("|", 3) + ["", "", ""])[:4]
            if not comment.startswith(mark):
                continue
            note = None
            if state == "PENDING":
                note = f"Slurm job {job} pending ({reason})" if reason and reason != "None" else f"Slurm job {job} pending"
            for name in comment[len(mark):].split(","):
                iid = f"{job}/{name}"
                known = self._known.get(iid)
                found.append(Instance(id=iid, runner_name=name, started_at=known.started_at if known else
                                      time.monotonic(), offer=known.offer if known else None, note=note))
        with self._lock:
            self._known = {i.id: i for i in found} | {i: v for i, v in self._known.items()
                                                      if time.monotonic() - v.started_at < 10}
            self._ending &= set(self._known)
        return found

    def release_jobs(self, job_ids: list[str]) -> None:
        """Nothing: a job's processes belong to its runner's Slurm job, which Slurm ends."""

    def describe_failure(self, runner_name: str) -> str:
        inst = next((i for i in self._known.values() if i.runner_name == runner_name), None)
        if inst is None:
            return f"see {self._runners(self.settings.dir)}/{runner_name}.out on the cluster"
        job = inst.id.split("/", 1)[0]
        try:
            info = self._run(f"scontrol -o show job {shlex.quote(job)}").out.strip()
        except BackendError as e:
            return str(e)
        fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
        return (f"Slurm job {job} is {fields.get('JobState', 'gone')} ({fields.get('Reason', '')}); its output: "
                f"{self._runners(self._dir())}/{runner_name}.out")

    def close(self) -> None:
        if self.ssh is not None:
            self.ssh.close()

    def uninstall(self) -> None:
        """The backend is removed and its runners' jobs are gone: its folder goes from the shared filesystem."""
        d = self._dir()
        # its own folder; the venv too once no other backend's folder is left beside it (they share it)
        q = shlex.quote
        self._run(f"cd {q(d)} 2> /dev/null || exit 0\nrm -rf -- {q(self.name)}\n"
                  f"[ -z \"$(ls -A | grep -vx -e venv -e venv.lock)\" ] && rm -rf -- venv venv.lock\n"
                  f"cd / && rmdir {q(d)} 2> /dev/null\necho removed\n", timeout=300
                  ).check(f"removing what dstack put in {d}")
        self.close()
        if self.ssh is not None:
            self.ssh.known_hosts.unlink(missing_ok=True)

    # --- Slurm

    def _request(self, req, offer: Offer) -> list[str]:
        """sbatch's options for a job of `req` (Requirements or None) on `offer`'s partition."""
        s = self.settings
        opts = [f"--cpus-per-task={req.cpu if req is not None and req.cpu else 1}"]
        if req is not None and req.memory_mib:
            opts.append(f"--mem={req.memory_mib}M")
        if req is not None and req.gpu is not None and req.gpu.count:
            name = (req.gpu.name or "").lower()
            opts.append(f"--gres=gpu:{name + ':' if name and _NAME.match(name) else ''}{req.gpu.count}")
        for key, value in (("partition", offer.instance_type or s.partition), ("account", s.account),
                           ("qos", s.qos), ("constraint", s.constraint), ("time", s.time_limit)):
            if value:
                opts.append(f"--{key}={value}")
        return opts + list(s.sbatch_options)

    def _refresh_offers(self) -> None:
        part = self.settings.partition
        out = self._run("sinfo -h -N -o '%N|%P|%c|%m|%G|%t'" + (f" -p {shlex.quote(part)}" if part else "")
                        ).check("sinfo")
        shapes: dict[tuple, Offer] = {}
        counts: dict[tuple, int] = {}
        for line in out.splitlines():
            node, partition, cpus, memory, gres, state = (line.split("|") + [""] * 6)[:6]
            if state.rstrip("*~#!%$@^-") in ("down", "drain", "drng", "fail", "maint", "unk", "boot", "futr") \
                    or not cpus.isdigit():
                continue
            default = partition.endswith("*")
            partition = partition.rstrip("*")
            if part is None and not default:
                continue
            gpus = _gpus(gres)
            resources = RunnerResources(cpus=int(cpus), memory_mib=int(memory) if memory.isdigit() else 0, gpus=gpus)
            key = (partition, resources.model_dump_json())
            shapes.setdefault(key, Offer(self.name, resources, instance_type=partition))
            counts[key] = counts.get(key, 0) + 1
        with self._lock:
            self._offers = list(shapes.values())
            self._nodes = {id(shapes[k]): n for k, n in counts.items()}
            self._offers_at = time.monotonic()

    def _quietly_refresh(self) -> None:
        try:
            self._refresh_offers()
        except BackendError as e:
            log.warning("slurm backend %s: no offers: %s", self.name, e)
            self._offers_at = time.monotonic()

    def _runners(self, d: str) -> str:
        """The folder of this backend's runners' scripts, logs and job folders, in `dir`."""
        return f"{d}/{self.name}"

    def _mark(self) -> str:
        """The start of its Slurm jobs' comment: this server's and this backend's (two backends on one cluster
        never take each other's jobs for orphans)."""
        return f"dstack:{self.server_id}:{self.name}:"

    def _dir(self) -> str:
        d = self.settings.dir
        if not d.startswith("~/"):
            return d
        if self._home is None:
            self._home = self._run('printf %s "$HOME"').check("asking for $HOME").strip()
        return self._home.rstrip("/") + d[1:]

    def _run(self, command: str, timeout: float = 60.0, accept_new: bool = False) -> Result:
        if self.ssh is not None:
            return self.ssh.run(self.settings.login, command, timeout=timeout, accept_new=accept_new)
        # on sh's stdin, never its command line (ps would show the runners' tokens); with the server's environment
        # less its secrets: sbatch passes on what it is given
        try:
            p = subprocess.run(["sh", "-s"], input=command, capture_output=True, text=True, timeout=timeout,
                               env=_plain_env())
        except subprocess.TimeoutExpired:
            raise BackendError(f"{first_command(command)} did not answer within {timeout:g} s") from None
        except OSError as e:
            raise BackendError(f"cannot run sh: {e}") from None
        if p.returncode == 127:
            raise BackendError(f"{first_command(command)}: not found on this machine: install Slurm's commands, or give "
                               f"the backend `login` (a login node reached over SSH)")
        return Result(p.returncode, p.stdout, p.stderr)


def _plain_env() -> dict[str, str]:
    """What Slurm's commands run with on this machine, and so what a batch job gets (sbatch's --export=ALL): the
    server's PATH, HOME, user, locale and SLURM_* variables, nothing else (its secrets stay with it). Not
    --export=NONE: it has slurmd load the user's login environment first, a second more per allocation."""
    import os

    keep = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("SLURM_")}


def _gpus(gres: str) -> list[Gpu]:
    """`gpu:a100:4(S:0-1),gpu:v100:2` -> 6 Gpus named by type (memory unknown: 0)."""
    found = []
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] != "gpu" or not parts[-1].isdigit():
            continue
        name = parts[1] if len(parts) == 3 else "gpu"
        found += [Gpu(name=name)] * int(parts[-1])
    return found
