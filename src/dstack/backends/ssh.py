"""`ssh`: the user's own machines, reached over SSH. Each host is one runner with all of its resources.

`dstack backends add ssh` (and `test`) connects to every host, accepts its host key on first use (ssh_client.py),
and looks at it: Python 3.11 or later, free disk in `dir`, Docker or not, CPUs, memory, and GPUs (`nvidia-smi -q
-x`, read with the runner's own parser). What was seen is the host's offer; the server looks again in the background
as it starts (an unreachable host has no offer until it answers, and `dstack backends` says why).

A runner on a host is started when a job needs it: the bootstrap script (bootstrap.py: the server's own dstack
from the wheels it serves, into `dir/venv`, kept for the next start) written to `dir/runner.sh` and started
detached (`setsid`), so that it outlives the SSH session; `dir/runner.pid` says which process it is and which
runner. It exits after its idle timeout. `terminate` sends it TERM (it stops its jobs and reports them), then KILL.
Removing the backend removes the runner, its virtual environment and every file of ours under `dir`.

Instance ids are `<host>/<runner name>`: one runner per host at a time."""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from dstack.backends.base import (
    BackendError,
    Bootstrap,
    CapacityError,
    Gpus,
    Instance,
    Offer,
    validated_settings,
)
from dstack.backends.ssh_client import Address, Connections, remote_dir
from dstack.core.base import Model
from dstack.core.resources import RunnerResources

log = logging.getLogger("dstack.server")
MIN_FREE_MIB = 2048  # the venv and a job's folder need at least this in `dir`

# run by the host's python3 (its program on stdin); Python 3.6 syntax, so that an old one gets as far as saying
# its version. Prints one JSON line.
_PROBE = r'''
import json, os, shutil, subprocess, sys
d = os.path.expanduser(sys.argv[1])
out = {"python": "%d.%d.%d" % sys.version_info[:3], "home": os.path.expanduser("~"), "dir": d}
try:
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.statvfs(d)
    out["free_mib"] = st.f_bavail * st.f_frsize // (1 << 20)
except OSError as e:
    out["dir_error"] = str(e)
out["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
try:
    out["meminfo"] = open("/proc/meminfo").read()
except OSError:
    out["meminfo"] = ""
def run(argv):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20)
        return p.stdout.decode(errors="replace") if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
out["nvidia_smi"] = run(["nvidia-smi", "-q", "-x"]) if shutil.which("nvidia-smi") else None
out["docker"] = bool(shutil.which("docker")) and run(["docker", "info", "--format", "{{.ServerVersion}}"]) is not None
out["user"] = __import__("pwd").getpwuid(os.geteuid()).pw_name
out["linux"] = bool(shutil.which("setsid")) and os.path.isdir("/proc/self")
print(json.dumps(out))
'''


class SSHHost(Address):
    """A host of the backend; `name` (default: its address) names its runner's offer."""

    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")

    def key(self) -> str:
        return self.name or self.host


class SSHSettings(Model):
    """The keys of `dstack backends add ssh`."""

    model_config = {"extra": "forbid"}

    hosts: list[SSHHost] = Field(min_length=1, max_length=1000)
    private_key: SecretStr | None = None  # else the server's SSH agent (SSH_AUTH_SOCK)
    proxy_jump: Address | None = None  # reach the hosts through this one
    dir: str = Field("~/.dstack-runner", min_length=1, max_length=500)  # ours on each host: removed with the backend
    python: str = Field("python3", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._/+-]+$")

    @field_validator("hosts", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        """`user@host:port` strings are hosts too."""
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        return [_parse_host(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("proxy_jump", mode="before")
    @classmethod
    def _jump(cls, value: Any) -> Any:
        return _parse_host(value) if isinstance(value, str) else value

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: str) -> str:
        return remote_dir(value)

    @model_validator(mode="after")
    def _unique(self) -> SSHSettings:
        keys = [h.key() for h in self.hosts]
        if dup := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"hosts are named twice: {', '.join(dup)} (give each a `name`)")
        return self


def _parse_host(text: str) -> Any:
    """`[user@]host[:port]` as an Address's keys (other values are left to pydantic)."""
    user, _, rest = text.rpartition("@")
    host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    out: dict[str, Any] = {"host": host}
    if user:
        out["user"] = user
    if port:
        out["port"] = int(port) if port.isdigit() else port
    return out


class SSHBackend(Gpus):
    settings_model: ClassVar[type] = SSHSettings
    secrets: ClassVar[tuple[str, ...]] = ("private_key",)
    startup_grace = 600.0  # the first start installs the venv
    list_interval = 10.0

    def __init__(self, name: str, settings: dict[str, Any], *, server_id: str, home: Path) -> None:
        self.settings = validated_settings(SSHSettings, name, settings)
        self.name, self.server_id, self.home = name, server_id, Path(home)
        s = self.settings
        self.max_runners = len(s.hosts)
        key = s.private_key.get_secret_value() if s.private_key else None
        self.ssh = Connections(self.home / "server" / "ssh" / f"{name}.known_hosts", key, s.proxy_jump)
        self._lock = threading.Lock()
        self._facts: dict[str, dict] = {}  # host key -> what the probe saw
        self._offers: list[Offer] = []
        self._notes: dict[str, str] = {}  # host key -> why it has no offer
        self._known: dict[str, Instance] = {}  # instance id -> instance, as created or listed
        self._host_of: dict[str, str] = {}  # runner name -> host key, for describe_failure
        self._closed = False

    def __repr__(self) -> str:
        return f"SSHBackend(name={self.name!r}, hosts={[h.key() for h in self.settings.hosts]!r})"

    # --- the backend interface

    def test(self) -> str:
        """Connect to every host anew (accepting host keys on first use) and look at it."""
        self.ssh.close()
        self.ssh.accepted.clear()
        self._probe_all(accept_new=True)
        bad = [f"{k}: {why}" for k, why in self._notes.items()]
        if bad:
            raise BackendError("; ".join(bad))
        said = [f"{o.instance_type}: {o.resources.describe()}" for o in self._offers]
        if self.ssh.accepted:
            said.append("host keys accepted on first use: " + ", ".join(self.ssh.accepted))
        return "; ".join(said)

    def prepare(self) -> None:
        """Look at the hosts in the background (the server starts meanwhile)."""
        threading.Thread(target=self._probe_all, name=f"ssh-probe-{self.name}", daemon=True).start()

    def note(self) -> str | None:
        with self._lock:
            if not self._facts and not self._notes:
                return "looking at the hosts"
            return "; ".join(f"{k}: {why}" for k, why in sorted(self._notes.items())) or None

    def offers(self) -> list[Offer]:
        return self._offers

    def create(self, offer: Offer, bootstrap: Bootstrap) -> Instance:
        host = self._host(offer.instance_type)
        with self._lock:
            busy = next((i for i in self._known.values() if i.id.split("/", 1)[0] == host.key()), None)
        if busy is not None:
            raise CapacityError(f"{host.key()} has a runner already ({busy.runner_name})")
        from dstack.backends.bootstrap import install_script
        from dstack.backends.wheelhouse import served_wheel

        d = self._dir(host)
        script = install_script(bootstrap, venv=f"{d}/venv", workdir=f"{d}/runner", python=self.settings.python,
                                backend=self.name, wheel=served_wheel(self.home), self_removing=True)
        q = shlex.quote
        # the script into its file (0600), then started in a session of its own, outliving this connection
        # (never over a running one's script: sh reads its script as it goes)
        command = (f"umask 077 && mkdir -p {q(d)} || exit 1\n"
                   f"if [ -f {q(d)}/runner.pid ] && read pid name < {q(d)}/runner.pid && {_alive('$pid', d)}; then "
                   f"echo \"busy $name\"; exit 0; fi\n"
                   f"cat > {q(d)}/runner.sh <<'DSTACK_SCRIPT_END' || exit 1\n{script}DSTACK_SCRIPT_END\n"
                   f"cd {q(d)} || exit 1\n"
                   f"nohup setsid sh {q(d)}/runner.sh < /dev/null >> {q(d)}/runner.out 2>&1 &\n"
                   f"echo \"$! {bootstrap.runner_name}\" > {q(d)}/runner.pid.new && mv {q(d)}/runner.pid.new "
                   f"{q(d)}/runner.pid && echo started\n")
        out = self.ssh.run(host, command).check(f"starting a runner on {host.label()}").split()
        if out[:1] == ["busy"]:
            raise CapacityError(f"{host.key()} has a runner already ({' '.join(out[1:])})")
        inst = Instance(id=f"{host.key()}/{bootstrap.runner_name}", runner_name=bootstrap.runner_name,
                        started_at=time.monotonic(), offer=offer)
        with self._lock:
            self._known[inst.id] = inst
            self._host_of[bootstrap.runner_name] = host.key()
        log.info("ssh: runner %s started on %s", bootstrap.runner_name, host.label())
        return inst

    def terminate(self, instance_id: str) -> bool:
        key, _, runner = instance_id.partition("/")
        host = next((h for h in self.settings.hosts if h.key() == key), None)
        if host is None:
            return True  # a host the backend no longer has
        try:
            d = self._dir(host)
            out = self.ssh.run(host, _stop(d, runner), timeout=60).check(f"stopping runner {runner}")
        except BackendError as e:
            log.warning("ssh: %s", e)
            return False
        done = "gone" in out
        if done:
            with self._lock:
                self._known.pop(instance_id, None)
        return done

    def list(self) -> list[Instance]:
        found = []

        def look(host: SSHHost) -> list[Instance]:
            try:
                d = self._dir(host)
                out = self.ssh.run(host, f"if [ -f {shlex.quote(d)}/runner.pid ] && read pid name < "
                                         f"{shlex.quote(d)}/runner.pid && {_alive('$pid', d)}; then echo \"$name\"; fi",
                                   timeout=30).check("looking for its runner")
            except BackendError as e:
                with self._lock:
                    self._notes[host.key()] = str(e)
                    # not seen is not gone: what is known there stays until the host answers
                    return [i for i in self._known.values() if i.id.split("/", 1)[0] == host.key()]
            with self._lock:
                seen = host.key() in self._facts
                if seen:  # it answers again
                    self._notes.pop(host.key(), None)
            if not seen:  # never looked at (unreachable as the server started): now, and it becomes an offer
                self._probe(host, accept_new=False)
                with self._lock:
                    self._offers = [self._offer(h) for h in self.settings.hosts if h.key() in self._facts]
            name = out.strip()
            if not name:
                return []
            inst = Instance(id=f"{host.key()}/{name}", runner_name=name, started_at=time.monotonic(),
                            offer=next((o for o in self._offers if o.instance_type == host.key()), None))
            return [inst]

        with ThreadPoolExecutor(max_workers=min(16, len(self.settings.hosts))) as pool:
            for got in pool.map(look, self.settings.hosts):
                found += got
        with self._lock:
            seen = {i.id for i in found}
            for iid in [i for i in self._known if i not in seen]:
                del self._known[iid]
            for inst in found:
                self._known.setdefault(inst.id, inst)
        return found

    def release_jobs(self, job_ids: list[str]) -> None:
        """Nothing: a job's processes belong to its runner, which stops them."""

    def describe_failure(self, runner_name: str) -> str:
        key = self._host_of.get(runner_name)
        host = next((h for h in self.settings.hosts if h.key() == key), None)
        if host is None:
            return "its host is not known"
        try:
            d = self._dir(host)
            tail = self.ssh.run(host, f"tail -q -n 5 {shlex.quote(d)}/runner.out {shlex.quote(d)}/runner.log",
                                timeout=20).out.strip()
        except BackendError as e:
            return str(e)
        return f"on {host.label()}, {d}/runner.log ends: {tail[-800:]}"

    def close(self) -> None:
        self._closed = True
        self.ssh.close()

    def uninstall(self) -> None:
        """The backend is removed and its runners are gone: stop any runner left, remove `dir` from every host
        that answers, and forget the host keys."""
        for host in self.settings.hosts:
            d = self._dir(host)
            self.ssh.run(host, f"{_stop(d, '')}\n{_remove_ours(d, ['venv', 'venv.lock', 'runner', 'runner.*'])}",
                         timeout=120).check(f"removing what dstack put in {d} on {host.label()}")
        self.ssh.close()
        self.ssh.known_hosts.unlink(missing_ok=True)

    # --- the hosts

    def _host(self, key: str | None) -> SSHHost:
        host = next((h for h in self.settings.hosts if h.key() == key), None)
        if host is None:
            raise BackendError(f"the ssh backend {self.name} has no host {key}")
        return host

    def _dir(self, host: SSHHost) -> str:
        """`dir` on `host`, with its home put in (the probe saw it; else asked now)."""
        d = self.settings.dir
        if not d.startswith("~/"):
            return d
        facts = self._facts.get(host.key())
        home = facts["home"] if facts else self.ssh.run(host, 'printf %s "$HOME"').check("asking for $HOME")
        return home.rstrip("/") + d[1:]

    def _probe_all(self, accept_new: bool = False) -> None:
        with ThreadPoolExecutor(max_workers=min(16, len(self.settings.hosts))) as pool:
            list(pool.map(lambda h: self._probe(h, accept_new), self.settings.hosts))
        with self._lock:
            self._offers = [self._offer(h) for h in self.settings.hosts if h.key() in self._facts]

    def _probe(self, host: SSHHost, accept_new: bool) -> None:
        from dstack.backends.bootstrap import MIN_PYTHON

        py = self.settings.python
        try:
            r = self.ssh.run(host, f"command -v {shlex.quote(py)} > /dev/null || {{ echo 'no {py}' >&2; exit 3; }}\n"
                                   f"{shlex.quote(py)} - {shlex.quote(self.settings.dir)} <<'DSTACK_PROBE_END'\n"
                                   f"{_PROBE.strip()}\nDSTACK_PROBE_END\n", timeout=60, accept_new=accept_new)
            if r.rc == 3:
                raise BackendError(f"there is no {py}: the runner needs Python {MIN_PYTHON} or later (install it, or "
                                   f"give the backend `python`)")
            facts = json.loads(r.check("looking at the host").strip().splitlines()[-1])
        except BackendError as e:
            self._no_offer(host, str(e))
            return
        except ValueError:
            self._no_offer(host, f"{py} answered what is not the probe's JSON: {r.out[-300:]!r} {r.err[-300:]!r}")
            return
        version = tuple(int(x) for x in facts["python"].split("."))
        if version[:2] < tuple(int(x) for x in MIN_PYTHON.split(".")):
            self._no_offer(host, f"its {py} is {facts['python']}: the runner needs Python {MIN_PYTHON} or later "
                                 f"(give the backend `python`, the path of one)")
            return
        if not facts.get("linux", True):
            self._no_offer(host, "it has no `setsid` or no /proc: the runner needs Linux")
            return
        if "dir_error" in facts:
            self._no_offer(host, f"{facts['dir']} cannot be made: {facts['dir_error']}")
            return
        if facts.get("free_mib", 0) < MIN_FREE_MIB:
            self._no_offer(host, f"{facts['dir']} has {facts.get('free_mib', 0)} MiB free: the runner needs "
                                 f"{MIN_FREE_MIB} MiB at least")
            return
        with self._lock:
            self._facts[host.key()] = facts
            self._notes.pop(host.key(), None)

    def _no_offer(self, host: SSHHost, why: str) -> None:
        log.warning("ssh backend %s: %s has no offer: %s", self.name, host.label(), why)
        with self._lock:
            self._facts.pop(host.key(), None)
            self._notes[host.key()] = why

    def _offer(self, host: SSHHost) -> Offer:
        from dstack.runner.resources import parse_meminfo_total_mib, parse_nvidia_smi_xml

        f = self._facts[host.key()]
        resources = RunnerResources(cpus=int(f.get("cpus") or 1), memory_mib=parse_meminfo_total_mib(f["meminfo"]),
                                    gpus=parse_nvidia_smi_xml(f["nvidia_smi"]) if f.get("nvidia_smi") else [],
                                    docker=bool(f.get("docker")), host_user=f.get("user"))
        return Offer(self.name, resources, instance_type=host.key())


def _remove_ours(d: str, names: list[str]) -> str:
    """sh: remove what dstack put in `d` (`names`, globs allowed), then `d` itself if nothing else is there: a `dir`
    that is a folder of the user's (`~/work`) keeps the user's files."""
    q = shlex.quote
    return (f"cd {q(d)} 2> /dev/null || exit 0\nrm -rf -- {' '.join(names)}\ncd / && rmdir {q(d)} 2> /dev/null\n"
            f"echo removed")


def _alive(pid: str, d: str) -> str:
    """sh: true when `pid` is the runner script of `d` (not another process that has its pid now)."""
    return f'kill -0 {pid} 2> /dev/null && grep -qF {shlex.quote(d)}/runner.sh /proc/{pid}/cmdline 2> /dev/null'


def _stop(d: str, runner: str) -> str:
    """sh: stop the runner of `d` (only if it is `runner`, unless that is empty): TERM, up to 20 s, then KILL of its
    session; prints `gone` once no such runner is left."""
    q = shlex.quote
    match = f'[ "$name" = {q(runner)} ] && ' if runner else ""
    return (f"if [ -f {q(d)}/runner.pid ] && read pid name < {q(d)}/runner.pid && {match}{_alive('$pid', d)}; then "
            f"kill -TERM $pid; i=0; while {_alive('$pid', d)} && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; "
            f"if {_alive('$pid', d)}; then kill -KILL -- -$pid 2> /dev/null; kill -KILL $pid; sleep 0.2; fi; "
            f"{_alive('$pid', d)} || {{ rm -f {q(d)}/runner.pid; echo gone; }}; else echo gone; fi")
