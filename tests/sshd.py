"""SSH hosts: Debian's OpenSSH server (`openssh-server`, scripts/test.sh installs it; no service is started), one
per test host made with `hosts.add(name)` (tests/netns.py), started as

    ip netns exec <the host's namespace> /usr/sbin/sshd -D -e -f <scratch>/sshd_config

with a configuration, an ed25519 host key and a client key pair of its own in a scratch folder
/tmp/dstack-test-sshd-*: ListenAddress the host's address, port 22, root logs in with the client key only
(PermitRootLogin prohibit-password, no passwords, no PAM, StrictModes no), TCP forwarding allowed.

Fixture `sshd` (per test): the first server, on host "sshd"; `sshd.start(name)` starts another one (e.g. a jump
host) on host `name`. Each is an `Sshd`: `host` (address), `port`, `user` ("root"), `private_key` (path),
`private_key_text`, `host_key_pub` (the host key's public line), `ns`, `exec(cmd)` (over ssh, from this machine),
`change_host_key()`. In a module: `from tests.sshd import sshd  # noqa: F401` (with `hosts` registered, as
tests/e2e/conftest.py does). Every server is killed and its folder removed at the end of the test; folders (and
their sshd) of a killed session are removed by the next one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import scratch

PREFIX = "dstack-test-sshd-"
SSHD = "/usr/sbin/sshd"
SSH_OPTIONS = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def _keygen(path: Path, comment: str) -> None:
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   capture_output=True, timeout=30)


def _kill_sshd_of(folder: Path) -> None:
    """sshd processes started with this folder's configuration (their command line names it)."""
    mark = str(folder).encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            pass


def sweep() -> None:
    """Remove the folders (and kill the sshd) of test sessions that are gone."""
    scratch.sweep(PREFIX, _kill_sshd_of)


class Sshd:
    def __init__(self, test_host, folder: Path, servers: Servers):
        self.test_host, self.folder, self._servers = test_host, folder, servers
        self.host, self.port, self.user, self.ns = test_host.address, 22, "root", test_host.netns
        self.private_key = folder / "id_ed25519"
        self.host_key = folder / "ssh_host_ed25519_key"
        self.config = folder / "sshd_config"
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen | None = None
        _keygen(self.private_key, "dstack-test-client")
        self.private_key_text = self.private_key.read_text()
        (folder / "authorized_keys").write_text(Path(f"{self.private_key}.pub").read_text())
        _keygen(self.host_key, "dstack-test-host")
        self.config.write_text("\n".join([
            f"ListenAddress {self.host}", f"Port {self.port}", f"HostKey {self.host_key}",
            f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "AllowTcpForwarding yes", "GatewayPorts no", "PrintMotd no",
            "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
        ]) + "\n")
        self._launch()

    @property
    def host_key_pub(self) -> str:
        return Path(f"{self.host_key}.pub").read_text().strip()

    def start(self, name: str) -> Sshd:
        """Another sshd of this test, on test host `name` (e.g. a jump host): stopped with this one."""
        return self._servers.start(name)

    def _launch(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation: sshd refuses to start without
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.test_host.run([SSHD, "-D", "-e", "-f", str(self.config)]),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"sshd on {self.host} ({self.ns}) did not start:\n{log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def change_host_key(self) -> str:
        """A new host key, and sshd restarted with it: its public line."""
        self.stop()
        _keygen(self.host_key, "dstack-test-host")
        self._launch()
        return self.host_key_pub

    def ssh_argv(self, *extra: str) -> list[str]:
        """The openssh client's command line for this server with the test's key (then a command, or -N ...)."""
        return ["ssh", *SSH_OPTIONS, "-i", str(self.private_key), "-p", str(self.port), *extra,
                f"{self.user}@{self.host}"]

    def exec(self, cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """`cmd` run by the server's shell, over ssh from this machine: its CompletedProcess (text)."""
        return subprocess.run([*self.ssh_argv(), cmd], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)


class Servers:
    def __init__(self, hosts) -> None:
        self.hosts = hosts
        self.servers: list[Sshd] = []
        self.folders: list[Path] = []
        sweep()

    def start(self, name: str) -> Sshd:
        """An sshd on test host `name` (made if need be)."""
        folder = scratch.owned_folder(PREFIX)
        self.folders.append(folder)
        server = Sshd(self.hosts.add(name), folder, self)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
            # what its sessions left in the host (their sshd, programs started over ssh)
            pids = subprocess.run(["ip", "netns", "pids", server.ns], capture_output=True, text=True, timeout=30)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for folder in self.folders:
            _kill_sshd_of(folder)
            shutil.rmtree(folder, ignore_errors=True)


def why_not() -> str | None:
    for tool in (SSHD, "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"SSH hosts need `{tool}`: `apt-get install openssh-server openssh-client` (scripts/test.sh does it)"
    return None


@pytest.fixture
def sshd(hosts):
    """The first SSH server of the test (host "sshd"); `sshd.start(name)`: another one."""
    reason = why_not()
    if reason:
        raise RuntimeError(reason)
    servers = Servers(hosts)
    try:
        yield servers.start("sshd")
    finally:
        servers.close()
