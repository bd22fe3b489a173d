"""Runs a job's commands with bash on the runner's own machine, in the job's working folder.

The job runs in its own process group (its own session), with its output on a pseudo-terminal,
so that programs line-buffer and progress bars stream as they are drawn. The job must not
outlive the runner, even a runner that is SIGKILLed:

- the job's shell gets PR_SET_PDEATHSIG=SIGKILL (Linux): the kernel kills it when the runner dies.
  That covers only the shell itself, not the processes it forks, so in addition
- a guard joins the job's process group: before the job's commands, the shell starts a detached
  subshell blocked reading a pipe whose other end only the runner holds. When the runner dies, the
  kernel closes that end, the guard's read ends and it SIGKILLs the whole group (`kill -9 0`).
  Processes that leave the group (setsid, daemons) escape both; the Docker executor has no such gap.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process; so every
job is forked from one long-lived thread of this module.

Dependencies (read-only mounts) appear at their paths inside the job's folder. As root (where namespaces
may be made: not in a container without CAP_SYS_ADMIN), the job runs in a private mount namespace where each
is a read-only bind mount of the store's folder: zero-copy, and read-only even for root. Otherwise they are copied there with
their write bits removed (read-only for any user but root).

A root runner's jobs run as an unprivileged user (runner/job_user.py): the shell is started as that user, or,
with bind mounts, the namespace and its mounts are made by the job's process itself before its shell runs (system
calls in the preexec function, as root), which then takes the job's user: no program runs as root in the job's
environment. A job's own uid (no account has it) always gets such a namespace: there its /etc/passwd and
/etc/group name it `dstack-job` (`id -un`, `whoami`, git and ssh look it up). /tmp stays the machine's (jobs read what others put
there); what the uid leaves in it goes when its lease ends (runner/job_user.py).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import functools
import logging
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dstack.core.models import JobSpec
from dstack.runner.executors.base import (
    ExecutorError,
    Mount,
    OutputCallback,
    job_env,
    job_script,
    pick_free_ports,
    relative_working_dir,
)
from dstack.runner.job_user import JobUser

log = logging.getLogger(__name__)

TERMINAL_ROWS, TERMINAL_COLUMNS = 24, 80
DRAIN_TIMEOUT = 5.0  # seconds to keep reading output after the job ended
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
# Runs before the job's commands. stdin is the guard pipe: keep it as fd 9 for a double-forked
# subshell (not a child of the job's shell, so the job's `wait` never waits for it), give the job
# /dev/null instead.
_GUARD_PREAMBLE = "exec 9<&0 </dev/null\n( (read -r _ <&9; kill -9 0) >/dev/null 2>&1 & )\nexec 9<&-\n"

_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dstack-host-spawner")


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def _die_with(parent_pid: int, no_new_privs: bool = False):
    """A preexec_fn: the child gets SIGKILL when the runner (its parent) dies; with `no_new_privs`, no program it
    runs gains privileges (setuid, file capabilities: a job as another user stays that user)."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if no_new_privs and _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                os._exit(126)
        if os.getppid() != parent_pid:  # the runner died before prctl took effect
            os._exit(137)

    return preexec


def _base_env() -> dict[str, str]:
    """A minimal environment, not the runner's: its own variables (tokens) stay out of jobs."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TERM": "xterm",
    }


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class HostExecution:
    def __init__(
        self,
        process: subprocess.Popen,
        guard_pipe: int,
        master_fd: int,
        on_output: OutputCallback,
        ports: list[int],
    ) -> None:
        self.image_digest: str | None = None
        self.failure_reason: str | None = None
        self.ports = ports
        self._process = process
        self._guard_pipe: int | None = guard_pipe
        self._master_fd = master_fd
        self._on_output = on_output
        self._drain_until: float | None = None
        self._lock = threading.Lock()
        self._group_lock = threading.Lock()
        self._group_reaped = False
        self._exit_code: int | None = None
        self.made: list[Path] = []  # folders of the machine's made to mount on: removed once it ended, if empty
        self.used: list[Path] = []  # folders of the machine's mounted on
        self._reader = threading.Thread(
            target=self._pump, name=f"dstack-host-output-{process.pid}", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        """The job's shell, which is also its process group id."""
        return self._process.pid

    def dispose(self) -> None:
        _remove_made(self.made, self.used)  # the process is gone once wait() returned; its pty is closed there
        self.made = self.used = []

    def _pump(self) -> None:
        fd = self._master_fd
        poller = select.poll()  # not select(): the runner may hold more than 1024 files
        poller.register(fd, select.POLLIN)
        try:
            while True:
                if not poller.poll(100):
                    if self._drain_until is not None and time.monotonic() > self._drain_until:
                        return  # something outside the job's group still holds the terminal
                    continue
                try:
                    data = os.read(fd, 65536)
                except OSError as e:
                    if e.errno == errno.EIO:  # Linux: every slave end is closed
                        return
                    raise
                if not data:
                    return
                try:
                    self._on_output(data)
                except Exception:
                    log.exception("on_output failed; the job's output goes on")
        finally:
            os.close(fd)

    def _kill_group(self, sig: int) -> None:
        # The group's id stays reserved while any member lives, and the guard lives until _reap():
        # until then the id cannot name someone else's processes, even after the shell was reaped.
        with self._group_lock:
            if self._group_reaped:
                return
            try:
                os.killpg(self._process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass  # the group is empty already

    def _reap(self) -> None:
        """After the shell ended: kill what it left in its group (the guard included)."""
        self._kill_group(signal.SIGKILL)
        with self._group_lock:
            self._group_reaped = True
            if self._guard_pipe is not None:
                os.close(self._guard_pipe)
                self._guard_pipe = None

    def wait(self) -> int:
        returncode = self._process.wait()
        with self._lock:
            if self._exit_code is None:
                self._reap()
                self._drain_until = time.monotonic() + DRAIN_TIMEOUT
                self._reader.join()
                self._exit_code = _exit_code(returncode)
            return self._exit_code

    def stop(self, grace: float = 10.0) -> None:
        if self._process.poll() is None:
            self._kill_group(signal.SIGTERM)
            try:
                self._process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group(signal.SIGKILL)  # the shell, or what it left behind
        self._process.wait()


class HostExecutor:
    """Runs `job.commands` with bash (sh where there is no bash) in `root / job.working_dir`, as `user` when
    given (a root runner's jobs: runner/job_user.py)."""

    def start(
        self,
        job: JobSpec,
        root: Path,
        mounts: list[Mount],
        env: dict[str, str],
        on_output: OutputCallback,
        user: JobUser | None = None,
    ) -> HostExecution:
        root = Path(root).resolve()
        cwd = (root / relative_working_dir(job.working_dir)).resolve()
        if not cwd.is_relative_to(root):
            raise ExecutorError(f"working_dir '{job.working_dir}' points outside the repository")
        cwd.mkdir(parents=True, exist_ok=True)  # as Docker does for a container's working dir
        shell = shutil.which("bash") or shutil.which("sh") or "/bin/sh"
        ports = pick_free_ports(job.ports)
        full_env = {**_base_env(), **job_env(job, ports, env)}
        script = job_script(job.commands)
        argv = [shell, "-c"]
        home = full_env.get("HOME") or os.path.expanduser("~")
        binds = None  # the job's mount namespace: (source, target, read-only), bound as root before it starts
        made: list[Path] = []
        used: list[Path] = []
        if (mounts or (user and user.own)) and namespaces_work():
            binds = _account_binds(root.parent, user, shell) if user and user.own else []
            try:
                with _mounted_lock:
                    for m in mounts:
                        dest = _mount_point(_host_path(m.target, root, home), root.parent, user, made)
                        binds.append((str(m.source), str(dest), m.read_only))
                        if not dest.is_relative_to(os.path.realpath(root.parent)):
                            used.append(dest)
                    _mounted.update(used)
            except BaseException:
                _remove_made(made, [])
                raise
        elif mounts:
            _copy_read_only(root, [m for m in mounts if m.read_only])
            _link_kept(root, home, [m for m in mounts if not m.read_only], user)
        try:
            execution = _spawner.submit(self._spawn, argv, script, cwd, full_env, on_output, ports, user,
                                        binds).result()
        except BaseException:
            _remove_made(made, used)
            raise
        execution.made, execution.used = made, used
        return execution

    @property
    def binds_anywhere(self) -> bool:
        return namespaces_work()

    # nothing to get ready ahead of a job: a process starts in milliseconds
    def warm(self, job: JobSpec, root: Path) -> bool:
        return False

    def claim(self, job: JobSpec) -> Path | None:
        return None

    def release(self, job: JobSpec) -> None:
        pass

    def close(self) -> None:
        pass

    def _spawn(
        self,
        argv: list[str],
        script: str,
        cwd: Path,
        env: dict[str, str],
        on_output: OutputCallback,
        ports: list[int],
        user: JobUser | None = None,
        binds: list[tuple[str, str, bool]] | None = None,
    ) -> HostExecution:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", TERMINAL_ROWS, TERMINAL_COLUMNS, 0, 0))
        guard_read, guard_write = os.pipe()  # non-inheritable: no other child ever holds them
        try:
            process = subprocess.Popen(
                [*argv, _GUARD_PREAMBLE + script],
                cwd=cwd,
                env=env,
                stdin=guard_read,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                # the user is set before preexec_fn runs: PR_SET_PDEATHSIG, which a change of user clears, holds
                **({"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
                   if user and binds is None else {}),
                preexec_fn=(_die_with(os.getpid(), no_new_privs=user is not None) if binds is None
                            else _enter_namespace(os.getpid(), binds, user)),
            )
        except OSError as e:
            os.close(master)
            os.close(guard_write)
            raise ExecutorError(f"could not start {argv[0]} in {cwd}: {e}") from e
        finally:
            os.close(slave)
            os.close(guard_read)
        return HostExecution(process, guard_write, master, on_output, ports)


_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18


def _libc():
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def namespaces_work() -> bool:
    """Whether this runner may make mount namespaces (root, and not in a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run(["/bin/true"], preexec_fn=_enter_namespace(os.getpid(), [], None), timeout=10,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _enter_namespace(parent_pid: int, binds: list[tuple[str, str, bool]], user: JobUser | None):
    """A preexec_fn (in the job's process, as root, before its shell runs): a mount namespace of its own with
    `binds` in it, then the job's user and the parent-death signal. No program runs as root meanwhile, and
    nothing of the job's environment is read: the job's shell is the first code of the job's."""
    libc = _libc()

    def fail(what: str) -> None:
        os.write(2, f"dstack: {what}: {os.strerror(ctypes.get_errno())}\n".encode(errors="replace"))
        os._exit(125)

    def preexec() -> None:
        if libc.unshare(_CLONE_NEWNS) != 0:
            fail("cannot make the job's mount namespace")
        if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            fail("cannot make the job's mounts private")
        for source, target, read_only in binds:
            if libc.mount(source.encode(), target.encode(), None, _MS_BIND, None) != 0:
                fail(f"cannot mount {source} at {target}")
            # no setuid program, no device, in what the job is given (read-write ones are its to fill)
            flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NODEV | (_MS_RDONLY if read_only else 0)
            if libc.mount(None, target.encode(), None, flags, None) != 0:
                fail(f"cannot restrict the mount at {target}")
        if user is not None:
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
        _die_with(parent_pid, no_new_privs=user is not None)()

    return preexec


def _account_binds(folder: Path, user: JobUser, shell: str) -> list[tuple[str, str, bool]]:
    """/etc/passwd and /etc/group with the job's own uid added (named `user.name`, its HOME `folder/home`), made
    in `folder/etc`, to bind over the machine's in the job's namespace. Nothing of the job's own settings goes in
    them."""
    etc = folder / "etc"
    etc.mkdir(mode=0o755, exist_ok=True)
    home = str(folder / "home")
    if any(c in home + shell for c in ":\n"):
        raise ExecutorError(f"the job's folder {folder} has ':' or a new line in its path; choose another --jobs-dir")
    binds = []
    for name, line in (("passwd", f"{user.name}:x:{user.uid}:{user.gid}:dstack job:{home}:{shell}\n"),
                       ("group", f"{user.name}:x:{user.gid}:\n")):
        source = Path("/etc", name)
        if not source.is_file():
            continue
        lines = [x for x in source.read_text().splitlines(keepends=True) if not x.startswith(f"{user.name}:")]
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        (etc / name).write_text("".join(lines) + line)
        os.chmod(etc / name, 0o644)
        binds.append((str(etc / name), str(source), True))
    return binds


def _host_path(target: str, root: Path, home: str) -> Path:
    """A mount's place: absolute as it is, `~/x` in the job's home, anything else in the job's folder."""
    if target.startswith("~/"):
        return Path(home) / target[2:]
    return Path(target) if target.startswith("/") else root / target


# where a root runner makes a missing folder of the machine's to mount on (an absolute artifact or cache of a job on
# its host): elsewhere (/etc, /usr, /var ...) a folder's mere existence may change what the machine does
MAKES_FOLDERS_IN = ("/opt", "/mnt", "/srv", "/data", "/datasets", "/models", "/scratch", "/workspace", "/home",
                    "/tmp", "/var/tmp")


_mounted: collections.Counter = collections.Counter()  # the machine's folders that running jobs mount on
_mounted_lock = threading.Lock()


def _remove_made(made: list[Path], used: list[Path]) -> None:
    """A job ended: the machine's folders it mounted on (`used`) are no longer its, and those made for it (`made`)
    go, deepest first, unless another job of this runner mounts on one or below it now (removing a mount point takes
    the mount away in the namespaces that have it), or something else put files in it."""
    with _mounted_lock:
        _mounted.subtract(used)
        busy = [p for p, n in _mounted.items() if n > 0]
        for folder in reversed(made):
            if any(b == folder or folder in b.parents for b in busy):
                break
            try:
                folder.rmdir()
            except OSError:
                break


def _mount_point(dest: Path, job_folder: Path, user: JobUser | None, made: list[Path] | None = None) -> Path:
    """The folder to mount on at `dest`, made where missing, one component at a time without following a link (one
    put on the way meanwhile is refused). In the job's folder (its code, its home) what is made is the job user's;
    a folder of the machine's is made (as root) only in MAKES_FOLDERS_IN."""
    real = Path(os.path.realpath(dest))
    job_folder = Path(os.path.realpath(job_folder))
    mine = real == job_folder or job_folder in real.parents
    if not mine and not real.is_dir():
        if real.exists():
            raise ExecutorError(f"cannot mount at {dest}: it is not a folder")
        if not any(real == Path(p) or Path(p) in real.parents for p in MAKES_FOLDERS_IN):
            raise ExecutorError(f"cannot mount at {dest}: no such folder on this runner's machine, and folders to "
                                f"mount on are made only in {', '.join(MAKES_FOLDERS_IN)}; make it there first, or "
                                "give the workflow an `image`")
    start = job_folder if mine else Path("/")
    fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY)
    try:
        current = start
        for part in real.relative_to(start).parts:
            current = current / part
            try:
                following = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                following = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                if mine and user is not None:
                    os.fchown(following, user.uid, user.gid)
                elif not mine and made is not None:
                    made.append(current)
            except OSError as e:
                raise ExecutorError(f"cannot mount at {dest}: '{part}' on the way is a link or not a folder "
                                    f"({e.strerror})") from None
            os.close(fd)
            fd = following
    finally:
        os.close(fd)
    return real


def _link_kept(root: Path, home: str, mounts: list[Mount], user: JobUser | None) -> None:
    """Without a namespace, a kept folder (`cache:`) in the job's folder or home is a symlink to it (what the job's
    code has at that path goes first); a path elsewhere, or one that a link leads out of them, cannot be had."""
    job_folder = Path(os.path.realpath(root.parent))  # its code and its home (not the HOME its `env` may name)
    for m in mounts:
        dest = _host_path(m.target, root, home)
        parent = Path(os.path.realpath(dest.parent))
        if not (parent == job_folder or job_folder in parent.parents) or dest.name in ("", ".", ".."):
            raise ExecutorError(f"cannot mount {m.target} on this runner's host (no mount namespace): it is not in "
                                "the job's folder or home")
        dest = _mount_point(parent, job_folder, user) / dest.name
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            dest.unlink()
        elif dest.is_dir():
            shutil.rmtree(dest)
        dest.symlink_to(m.source)


def _copy_read_only(root: Path, mounts: list[Mount]) -> None:
    for m in mounts:
        dest = root / m.target
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(m.source, dest, symlinks=True)
        if m.read_only:
            for dirpath, dirs, files in os.walk(dest):
                for n in files + dirs:
                    p = os.path.join(dirpath, n)
                    if not os.path.islink(p):
                        os.chmod(p, os.lstat(p).st_mode & ~0o222)
            os.chmod(dest, os.stat(dest).st_mode & ~0o222)
