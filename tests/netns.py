"""Test hosts: network namespaces with addresses of their own on a bridge the test creates (the recipe of
shared/DESIGN.md), so that a runner started in one (`ip netns exec`) reaches the server only over the network.

    bridge dsb<pid>  10.77.N.1/24   <- a server bound here is reachable from every host
      veth dsv<pid>x<i> -- dsp<pid>x<i> (in namespace dstack-<pid>-<name>)  10.77.N.(i+1)/24 (the x ends the pid)

Names carry the test process's pid (hex), so parallel runs never clash and a run that died (SIGKILL) leaves
things that the next run removes (their pid is gone). N is a /24 of 10.77 that no interface of this machine
uses. Everything is removed at the end, also on failure. Traffic goes only to these addresses and loopback.

Use: `from tests.netns import hosts  # noqa: F401` in a test module, then `hosts.add("h1")`."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

LOCK = Path("/tmp/dstack-netns.lock")
_OURS = re.compile(r"^(?:ds[bvp]|dstack-)([0-9a-f]+)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _iptables(*args: str) -> None:
    """A rule of ours, when iptables is here (no iptables: no firewall to let our traffic through)."""
    if shutil.which("iptables"):
        subprocess.run(["iptables", *args], capture_output=True, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def remove_leftovers() -> list[str]:
    """Namespaces, links and forwarding rules of test runs whose process is gone."""
    removed = []
    if shutil.which("iptables"):
        rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, timeout=30).stdout
        for rule in rules.splitlines():
            m = re.search(r"-i dsb([0-9a-f]+) ", rule)
            if m and not _alive(int(m.group(1), 16)):
                _iptables("-D", *rule.split()[1:])
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OURS.match(name)
        if m and name.startswith("dstack-") and not _alive(int(m.group(1), 16)):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(": ")
        if len(parts) < 2:
            continue
        name = parts[1].split("@")[0]
        m = _OURS.match(name)
        if m and name.startswith(("dsb", "dsv")) and not _alive(int(m.group(1), 16)):
            _ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> int:
    used = set(re.findall(r"inet 10\.77\.(\d+)\.", _ip("-4", "-o", "addr", "show").stdout))
    for n in range(256):
        if str(n) not in used:
            return n
    raise RuntimeError("no /24 of 10.77.0.0/16 is free on this machine")


class Host:
    def __init__(self, name: str, netns: str, address: str, veth: str, peer: str):
        self.name, self.netns, self.address, self.veth, self.peer = name, netns, address, veth, peer

    def run(self, argv: list[str]) -> list[str]:
        """`argv` as a command line that runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        """The host's cable out: nothing reaches it, nor leaves it."""
        _ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        _ip("link", "set", self.veth, "up")

    def kill_connections(self, to: str) -> None:
        """Abort this host's TCP connections to address `to` (a cut that the host's programs notice at once)."""
        subprocess.run(self.run(["ss", "-K", "dst", to]), capture_output=True, timeout=30)

    def _tc(self, outgoing: bool) -> list[str]:
        """tc on the link's end that sends: the bridge's for traffic towards this host, the host's own else."""
        return self.run(["tc"]) + ["qdisc"] if outgoing else ["tc", "qdisc"]

    def shape(self, rate: str, outgoing: bool = False) -> None:
        """Traffic towards this host (`outgoing`: from it) at most `rate` (tc's words: 400mbit)."""
        dev = self.peer if outgoing else self.veth
        subprocess.run([*self._tc(outgoing), "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                        "latency", "100ms"], check=True, capture_output=True, timeout=30)

    def unshape(self) -> None:
        for outgoing in (False, True):
            subprocess.run([*self._tc(outgoing), "del", "dev", self.peer if outgoing else self.veth, "root"],
                           capture_output=True, timeout=30)


class Hosts:
    """A bridge at `address` and the hosts added to it."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid():x}"
        self.bridge = f"dsb{self.tag}"
        self.hosts: dict[str, Host] = {}
        with open(LOCK, "a") as lock:  # parallel runs pick subnets one at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_leftovers()
            self.subnet = _free_subnet()
            self.address = f"10.77.{self.subnet}.1"
            _ip("link", "add", self.bridge, "type", "bridge")
            try:
                _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
                # hosts reach each other across the bridge: Docker's FORWARD policy is DROP, and bridged
                # traffic goes through iptables (br_netfilter)
                _iptables("-I", "FORWARD", *self._forward_rule())
            except BaseException:
                self.close()
                raise

    def add(self, name: str) -> Host:
        if name in self.hosts:
            return self.hosts[name]
        i = len(self.hosts) + 1
        netns, veth, peer = f"dstack-{self.tag}-{name}", f"dsv{self.tag}x{i}", f"dsp{self.tag}x{i}"
        address = f"10.77.{self.subnet}.{i + 1}"
        _ip("netns", "add", netns)
        host = Host(name, netns, address, veth, peer)
        self.hosts[name] = host
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("link", "set", peer, "netns", netns)
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", peer)
        _ip("-n", netns, "link", "set", peer, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return host

    def _forward_rule(self) -> tuple[str, ...]:
        return ("-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT")

    def close(self) -> None:
        _iptables("-D", "FORWARD", *self._forward_rule())
        for host in self.hosts.values():
            _ip("netns", "delete", host.netns, check=False)  # takes its end of the veth, and so the pair
            _ip("link", "delete", host.veth, check=False)
        _ip("link", "delete", self.bridge, check=False)
        self.hosts.clear()


def why_not() -> str | None:
    """Why test hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "test hosts (network namespaces) need root"
    for tool in ("ip", "tc", "ss", "runuser"):
        if shutil.which(tool) is None:
            return f"test hosts need `{tool}` (iproute2, util-linux)"
    return None


@pytest.fixture(scope="session")
def hosts():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    try:
        made = Hosts()
    except RuntimeError as e:
        pytest.skip(f"cannot make test hosts here: {e}")
    try:
        yield made
    finally:
        made.close()
