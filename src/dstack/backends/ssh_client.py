"""Commands on another machine over SSH (paramiko), for the `ssh` and `slurm` backends.

Host keys are trusted on first use, and only then: the first connection that may accept a key (`dstack backends add`
and `dstack backends test`, which print its fingerprint) writes it to the backend's known-hosts file
(`DSTACK_HOME/server/ssh/<backend>.known_hosts`, mode 0600); every later connection requires that key, and a key
that changed is refused with what to do. A jump host (`proxy_jump`) is checked the same way, and the target is
reached through a channel of the jump host's connection.

Authentication is the backend's private key (a secret: stored encrypted, held in memory only), else the SSH agent
of the server's environment (SSH_AUTH_SOCK). Connections are kept and reused (a command costs a round trip, not a
handshake); one that broke is made again once."""

from __future__ import annotations

import io
import logging
import re
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from dstack.backends.base import BackendError
from dstack.core.base import Model

log = logging.getLogger("dstack.server")
CONNECT_TIMEOUT = 10.0
paramiko_log = logging.getLogger("paramiko")
if paramiko_log.level == logging.NOTSET:  # its debug log is noise for users
    paramiko_log.setLevel(logging.WARNING)


class Address(Model):
    """Where a machine answers SSH, and as whom we log in."""

    model_config = {"extra": "forbid"}

    host: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._:\[\]-]+$")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("root", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")

    def label(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")

    def known_as(self) -> str:
        """The name of its key in a known-hosts file (OpenSSH's form)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def check(self, doing: str) -> str:
        if self.rc == -1:  # no exit status: the channel closed first
            raise BackendError(f"{doing}: the connection closed before the command ended")
        if self.rc != 0:
            raise BackendError(f"{doing} exited {self.rc}: {(self.err or self.out).strip()[-1500:]}")
        return self.out


def fingerprint(key) -> str:
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def load_key(text: str):
    """A private key (OpenSSH or PEM text) as paramiko's; a BackendError that never quotes it."""
    import paramiko

    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except paramiko.PasswordRequiredException:
            raise BackendError("the private key is encrypted: give the key without a passphrase, or use an SSH "
                               "agent (leave private_key out; the server uses SSH_AUTH_SOCK)") from None
        except (paramiko.SSHException, ValueError, IndexError):
            continue
    raise BackendError("private_key is not a private key that SSH can use (ed25519, ecdsa or rsa, OpenSSH or PEM)")


class Connections:
    """The SSH connections of one backend: to each address, through its jump host when it has one."""

    def __init__(self, known_hosts: Path, private_key: str | None = None, jump: Address | None = None):
        self.known_hosts = Path(known_hosts)
        self.jump = jump
        self._key = load_key(private_key) if private_key else None
        self._lock = threading.Lock()  # the dicts below; never held while connecting
        self._clients: dict[tuple[str, int, str], object] = {}
        self._connecting: dict[tuple[str, int, str], threading.Lock] = {}  # one connect per address at a time
        self.accepted: list[str] = []  # keys accepted on first use by this object ("host: type SHA256:...")

    def run(self, address: Address, script: str, timeout: float = 120.0, accept_new: bool = False) -> Result:
        """`script` (POSIX sh) on `address`: its exit status and output. It goes to `sh -s` on the channel's stdin,
        never on a command line (`ps` there would show what it holds, the runners' tokens), and whatever the
        login's shell is (tcsh on many clusters). A connection that fails is a BackendError naming the host; one
        found broken as the command is sent is made again once (a script that started is never sent twice)."""
        for attempt in (1, 2):
            client = self._client(address, accept_new)
            try:
                chan = client.get_transport().open_session(timeout=CONNECT_TIMEOUT)
            except (OSError, EOFError, AttributeError, _ssh_exception()) as e:
                self._drop(address)
                if attempt == 2:
                    raise BackendError(f"{address.label()}: the SSH connection broke: {e or type(e).__name__}") \
                        from None
                continue
            try:
                return _exec(chan, script, timeout)
            except TimeoutError as e:
                raise BackendError(f"{address.label()}: {first_command(script)}: {e}") from None
            except (OSError, EOFError, _ssh_exception()) as e:
                self._drop(address)
                raise BackendError(f"{address.label()}: the SSH connection broke while `{first_command(script)}` "
                                   f"ran: {e or type(e).__name__}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    def _drop(self, address: Address) -> None:
        with self._lock:
            c = self._clients.pop((address.host, address.port, address.user), None)
        if c is not None:
            c.close()

    def _cached(self, key: tuple[str, int, str]):
        with self._lock:
            client = self._clients.get(key)
        transport = client.get_transport() if client is not None else None
        return client if transport is not None and transport.is_active() else None

    def _client(self, address: Address, accept_new: bool):
        key = (address.host, address.port, address.user)
        if (client := self._cached(key)) is not None:
            return client
        with self._lock:
            connecting = self._connecting.setdefault(key, threading.Lock())
        with connecting:  # a host that does not answer holds up its own commands, not the other hosts'
            if (client := self._cached(key)) is not None:
                return client
            sock = None
            if self.jump is not None:
                jump = self._client(self.jump, accept_new)  # one connection to the jump host, kept like the others
                try:
                    sock = jump.get_transport().open_channel("direct-tcpip", (address.host, address.port),
                                                             ("127.0.0.1", 0), timeout=CONNECT_TIMEOUT)
                except Exception as e:
                    raise BackendError(f"{address.label()}: the jump host {self.jump.label()} could not reach it: "
                                       f"{e}") from None
            client = self._connect(address, accept_new, sock)
            with self._lock:
                self._clients[key] = client
            return client

    def _connect(self, address: Address, accept_new: bool, sock):
        import paramiko

        client = paramiko.SSHClient()
        keys = client.get_host_keys()
        if self.known_hosts.is_file():
            keys.load(str(self.known_hosts))
        client.set_missing_host_key_policy(_FirstUse(self, accept_new))
        try:
            client.connect(address.host, port=address.port, username=address.user, pkey=self._key, sock=sock,
                           timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
                           allow_agent=self._key is None, look_for_keys=False)
        except paramiko.BadHostKeyException as e:
            client.close()
            raise BackendError(
                f"{address.label()}: its host key changed (it showed {e.key.get_name()} {fingerprint(e.key)}, the "
                f"key accepted before is {fingerprint(e.expected_key)}): the connection is refused, as the host may "
                f"be another machine. If it was reinstalled, remove its line ({address.known_as()}) from "
                f"{self.known_hosts}, then `dstack backends test` the backend to accept the new key") from None
        except paramiko.AuthenticationException:
            client.close()
            how = "the backend's private_key" if self._key is not None else "the SSH agent's keys (no private_key)"
            raise BackendError(f"{address.label()}: SSH refused {how}: add its public key to "
                               f"~{address.user}/.ssh/authorized_keys there") from None
        except BackendError:
            client.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as e:
            client.close()
            raise BackendError(f"{address.label()}: cannot connect over SSH: {e or type(e).__name__}") from None
        return client


def _ssh_exception():
    import paramiko

    return paramiko.SSHException


class _FirstUse:
    """A host key not in the known-hosts file: accepted and written there when the caller may accept new keys
    (adding or testing the backend), else refused."""

    def __init__(self, owner: Connections, accept_new: bool):
        self.owner, self.accept_new = owner, accept_new

    def missing_host_key(self, client, hostname: str, key) -> None:
        import os

        shown = f"{key.get_name()} {fingerprint(key)}"
        if not self.accept_new:
            raise BackendError(f"{hostname}: its host key ({shown}) was never accepted: `dstack backends test` the "
                               f"backend to accept it")
        path = self.owner.known_hosts
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.owner.accepted.append(f"{hostname}: {shown}")
        log.info("ssh: accepted the host key of %s on first use: %s", hostname, shown)


def remote_dir(value: str) -> str:
    """A `dir` setting (ssh, slurm): a folder of its own on the other machine, absolute or under the login's home
    (`~/...`), that a shell quotes safely."""
    if any(ord(c) < 32 or c in "'\\" for c in value):
        raise ValueError("dir has a quote, a backslash or a control character")
    if value.rstrip("/") in ("", "~", "/"):
        raise ValueError("dir is a folder of its own (what dstack puts there goes with the backend)")
    if not (value.startswith("/") or value.startswith("~/")) or ".." in value.split("/"):
        raise ValueError("dir is an absolute path, or one under the login's home (~/...), without '..'")
    return value.rstrip("/")


def first_command(script: str) -> str:
    """The script's first command's name, for messages (`sbatch`, not the `umask` that may come before it)."""
    words = [w for w in re.split(r"[\s;&|()]+", script) if w and "=" not in w]
    skip = {"umask", "mkdir", "cd", "exec", "set", "if", "then", "077", "022", "-p", "&&", "||", "[", "!"}
    return next((w for w in words if w not in skip and not w.startswith(("-", "/", "'", "$"))), words[0] if words
                else "sh")


def _exec(chan, script: str, timeout: float) -> Result:
    chan.settimeout(timeout)
    try:
        chan.exec_command("exec sh -s")
        chan.sendall(script.encode() + (b"" if script.endswith("\n") else b"\n"))
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        while True:  # both streams, so that neither fills its window while the other is read
            got = False
            if chan.recv_ready():
                out += chan.recv(65536)
                got = True
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                got = True
            if not got:
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no end after {timeout:g} s")
                chan.status_event.wait(0.01)
        while chan.recv_ready():
            out += chan.recv(65536)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        return Result(chan.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace"))
    finally:
        chan.close()


def sh(*argv: str) -> str:
    return " ".join(shlex.quote(a) for a in argv)
