"""A Docker daemon of the tests' own, that they stop, kill and start again; the shared one at
/var/run/docker.sock serves the other tests and is never restarted.

It runs beside the shared one with its own socket, data root, exec root (so its own containerd) and pid
file, and no bridge and no iptables rules (which would be docker0 and the DOCKER chains of the shared one):
jobs use host networking. Started as root; `destroy` leaves nothing behind, even after a SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 60.0  # seconds for dockerd to answer
STOP_TIMEOUT = 60.0  # seconds for dockerd to exit once signalled (it stops its containers first)


class PrivateDockerd:
    def __init__(self, base: Path, *flags: str) -> None:
        self.base = base
        self.socket = base / "docker.sock"
        self.host = f"unix://{self.socket}"  # for DOCKER_HOST
        self.flags = list(flags)
        self.process: subprocess.Popen | None = None
        self.started_with: tuple[str, ...] = ()  # the flags of `start`

    def command(self) -> list[str]:
        return ["dockerd", "--host", self.host, "--data-root", str(self.base / "data"),
                "--exec-root", str(self.base / "exec"), "--pidfile", str(self.base / "docker.pid"),
                "--bridge=none", "--iptables=false", "--ip-masq=false", *self.flags]

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.host, timeout=30)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, *flags: str) -> None:
        """Start dockerd (again, with the same data root) with `flags` besides the usual ones; returns once it
        answers."""
        assert not self.running, "dockerd runs already"
        (self.base / "docker.pid").unlink(missing_ok=True)  # left by one that was killed
        self.started_with = flags
        with open(self.base / "dockerd.log", "ab") as log:
            self.process = subprocess.Popen([*self.command(), *flags], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                client = self.client()
                try:
                    client.ping()
                    return
                finally:
                    client.close()
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not answer within {START_TIMEOUT:.0f} s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to dockerd and wait for it to exit: SIGTERM stops its containers first (unless
        --live-restore), SIGKILL leaves them running (its containerd dies with it, their shims do not)."""
        assert self.process is not None
        containerd = [pid for pid in self._leftovers() if b"containerd.toml" in _cmdline(pid)]
        self.process.send_signal(sig)
        self.process.wait(STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        # it dies with dockerd; until its zombie is reaped (here PID 1 takes seconds), a dockerd started again
        # takes it for alive and waits for it in vain
        while any(Path(f"/proc/{pid}").exists() for pid in containerd):
            if time.monotonic() > deadline:
                raise RuntimeError("the containerd of dockerd outlived it")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.base / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop dockerd with its containers, and remove everything it made."""
        try:
            if self.running:
                self.stop()
            if self._leftovers():  # containers of a killed dockerd: one started again stops them
                self.start()
                self.stop()
        except Exception:
            pass
        finally:
            if self.running:
                self.process.kill()
                self.process.wait()
            for pid in self._leftovers():  # its containerd and shims, as a last resort
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            for mount in sorted(self._mounts(), key=len, reverse=True):  # the data root, netns, overlays
                subprocess.run(["umount", "-l", mount], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(self.base, ignore_errors=True)

    def _leftovers(self) -> list[int]:
        """The processes whose command line names this daemon's folder (its containerd, its shims)."""
        mine = str(self.base).encode()
        return [int(e.name) for e in Path("/proc").iterdir()
                if e.name.isdigit() and int(e.name) != os.getpid() and mine in _cmdline(int(e.name))]

    def _mounts(self) -> list[str]:
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == str(self.base) or point.startswith(f"{self.base}/"):
                    found.append(point)
        return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
