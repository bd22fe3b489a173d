"""Who runs a runner's host jobs, and where their folders are.

A runner that runs as root runs each host job as a user of its own: a uid from a range that no account uses
(DSTACK_JOB_UIDS, default 1900000000-1900065535), leased for the job's lifetime (a lock file per uid in
/run/dstack-runner/job-uids, so that the runners of one machine never share one), named `dstack-job` in the job's own
/etc/passwd. So a job cannot read what its runner or the server keep on the machine (the server's token and
database, the runner's token), nor another job's folder, environment or processes. When the job's shell has
ended, every process of its uid is killed (one `kill(-1, SIGKILL)` made as that uid, which the kernel makes
atomic against fork) before root touches its folder: a process the job left behind (setsid, a daemon) can no
longer swap a file of its folder for a link to one of root's while the runner saves its artifacts or removes
the folder. What the uid left in /tmp, /var/tmp and /dev/shm goes when the lease ends. `--job-user USER` names
one user for all jobs instead (they share it: the isolation between jobs, and the kill of what a job leaves
behind, are then the user's to give up).

Such users cannot enter `/root` or `DSTACK_HOME` (0700), so the jobs' folders live under a folder they can pass
through: `--jobs-dir` (default /var/lib/dstack-runner), one subfolder per runner folder. In a job's folder the
runner's own files stay root's; its code, and a home folder (HOME), are the job user's. A runner that does not
run as root runs jobs as itself, in its own folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pwd
import re
import secrets
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dstack.core.names import DEFAULT_JOB_USER as DEFAULT_USER
from dstack.storage.tree import remove_tree

log = logging.getLogger(__name__)

DEFAULT_JOBS_DIR = Path("/var/lib/dstack-runner")
DEFAULT_UIDS = "1900000000-1900065535"  # DSTACK_JOB_UIDS: the uids that jobs get one each of; no account's
LEASES = "uids"  # under the jobs base (where there is no /run): a lock file per uid leased to a job
MACHINE_LEASES = Path("/run/dstack-runner/job-uids")  # the same, for every runner of the machine


class JobUserError(Exception):
    pass


class JobUidsError(JobUserError):
    """DSTACK_JOB_UIDS is wrong."""


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    own: bool = False  # a uid of this job's own (leased; no account has it)

    @classmethod
    def named(cls, name: str) -> JobUser:
        try:
            pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
        except KeyError:
            raise JobUserError(f"no user '{name}' on this machine (--job-user)") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))


def choose(name: str | None, base: Path | None = None) -> JobUsers | None:
    """Who runs host jobs, when it is not the runner itself: the user `name`, else (a root runner) a user of each
    job's own. None: jobs run as the runner does (it is not root, or `--job-user` names its own user)."""
    if name is not None and not name.strip():
        raise JobUserError("--job-user is empty: name a user of this machine (or leave the option out)")
    if os.geteuid() != 0:
        if name is not None and JobUser.named(name).uid != os.geteuid():
            raise JobUserError(f"only a runner that runs as root can run jobs as another user ('{name}'); "
                               "leave out --job-user")
        return None
    if name is not None and name != DEFAULT_USER:
        user = JobUser.named(name)
        return None if user.uid == 0 else JobUsers(named=user)
    # one lease folder for the whole machine (whatever each runner's --jobs-dir): no two runners lease one uid
    leases = MACHINE_LEASES if MACHINE_LEASES.parent.parent.is_dir() else (base or DEFAULT_JOBS_DIR) / LEASES
    return JobUsers(uids=_uid_range(os.environ.get("DSTACK_JOB_UIDS") or DEFAULT_UIDS), leases=leases)


def _uid_range(text: str) -> range:
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        raise JobUidsError(f"DSTACK_JOB_UIDS={text!r} is not a range of uids: expected FIRST-LAST, e.g. "
                           f"{DEFAULT_UIDS}") from None
    if not 1000 <= first <= last < 2**31 - 1:
        raise JobUidsError(f"DSTACK_JOB_UIDS={text!r}: the uids must be from 1000 to {2**31 - 2}, FIRST <= LAST")
    taken = sorted((pw.pw_uid, pw.pw_name) for pw in pwd.getpwall() if first <= pw.pw_uid <= last)
    if taken:
        raise JobUidsError(f"DSTACK_JOB_UIDS={text!r}: uid {taken[0][0]} is the account {taken[0][1]!r}'s; choose "
                           "uids that no account has")
    return range(first, last + 1)


class JobUsers:
    """Whom a root runner's host jobs run as: one named user for all (`named`), or a uid of each job's own, leased
    from `uids` (locks in `leases`) and released once no process of it is left."""

    def __init__(self, named: JobUser | None = None, uids: range | None = None, leases: Path | None = None):
        self.named, self.uids, self.leases = named, uids, leases
        self._held: dict[int, int] = {}  # uid -> its lock file's descriptor
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.named.name if self.named else DEFAULT_USER

    @property
    def sample(self) -> JobUser:
        """Any of the users (whose rights to pass through folders are those of all)."""
        if self.named:
            return self.named
        return JobUser(DEFAULT_USER, self.uids[0], self.uids[0], (self.uids[0],), own=True)

    def lease(self) -> JobUser:
        """The user of a job about to start: the named one, or a uid no job of any runner of this machine has now,
        with nothing of an earlier job of it left running."""
        if self.named:
            return self.named
        self.leases.mkdir(mode=0o700, parents=True, exist_ok=True)
        n = len(self.uids)
        start = secrets.randbelow(n)  # not the uid the last job had: what it left in /tmp is swept, but even so
        for i in range(n):
            uid = self.uids[(start + i) % n]
            path = self.leases / str(uid)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:  # unlinked by its last holder meanwhile
                    raise BlockingIOError
            except (BlockingIOError, FileNotFoundError):
                os.close(fd)
                continue
            user = JobUser(DEFAULT_USER, uid, uid, (uid,), own=True)
            _kill_all(uid)  # of a runner that was killed while its job ran
            with self._lock:
                self._held[uid] = fd
            return user
        raise JobUserError(f"all {n} job uids (DSTACK_JOB_UIDS) are in use")

    def recover(self) -> None:
        """The uids that runners killed while their jobs ran left leased (their lock files, that no process
        holds): what runs as them is killed and what they left swept, before the runner touches their folders."""
        if not self.uids or not self.leases.is_dir():
            return
        for path in self.leases.iterdir():
            if not path.name.isdigit() or int(path.name) not in self.uids:
                continue
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live runner's job has it
                log.info("job uid %s was left leased (a runner was killed): killing its processes", path.name)
                _kill_all(int(path.name))
                _sweep(int(path.name))
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    def end(self, user: JobUser) -> None:
        """The job's shell has ended: no process of a job's own user is left when this returns."""
        if user.own:
            _kill_all(user.uid)

    def release(self, user: JobUser) -> None:
        """The job's folder is gone: what its own user left elsewhere goes, and its uid is free."""
        if not user.own:
            return
        _kill_all(user.uid)
        _sweep(user.uid)
        with self._lock:
            fd = self._held.pop(user.uid, None)
        if fd is not None:
            (self.leases / str(user.uid)).unlink(missing_ok=True)
            os.close(fd)


def _kill_all(uid: int, patience: float = 10.0) -> None:
    """SIGKILL every process of `uid` and wait until none is left. `kill -9 -1` run as the uid reaches each
    process it may signal (its real or saved uid is `uid`, also one that ran a setuid program, or that lives in
    a namespace of its own), never the caller, and no fork completes meanwhile; it is sent at least once,
    whatever /proc shows. Were the uid out of processes (RLIMIT_NPROC), root kills what /proc names. Some left
    after `patience`: JobUserError (nothing of the job's may be touched by root then)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], cwd="/",
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           close_fds=True, env={}, timeout=10)
        except (OSError, subprocess.SubprocessError):
            for pid in _processes(uid):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        alive = _processes(uid)
        if not alive:
            return
        if time.monotonic() > deadline:
            raise JobUserError(f"processes of job uid {uid} are still alive after SIGKILL: {alive[:10]}")
        time.sleep(0.01)


def _processes(uid: int) -> list[int]:
    """The live processes whose real or saved uid is `uid` (/proc/PID/status: a process that made itself not
    dumpable hides its owner from the modes of /proc/PID). A zombie counts when threads of it still run (its
    leader thread exited alone)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read(4096)
        except OSError:
            continue
        fields = {}
        for line in status.split(b"\n"):
            key, _, value = line.partition(b":")
            if key in (b"State", b"Uid", b"Threads"):
                fields[key] = value.split()
        uids = fields.get(b"Uid") or []
        if not uids or (int(uids[0]) != uid and int(uids[2]) != uid):
            continue
        state = (fields.get(b"State") or [b"Z"])[0]
        threads = int((fields.get(b"Threads") or [b"1"])[0])
        if state not in (b"Z", b"X") or threads > 1:
            found.append(int(name))
    return found


def _sweep(uid: int) -> None:
    """What `uid` left in the machine's shared scratch folders and System V IPC, which the next job of the uid
    would find."""
    for folder in ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue"):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    remove_tree(Path(entry.path))
            except OSError:
                pass
    for kind, flag in (("shm", "-m"), ("msg", "-q"), ("sem", "-s")):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except OSError:
            continue
        columns = lines[0].split() if lines else []
        for line in lines[1:]:
            row = dict(zip(columns, line.split(), strict=False))
            if uid in (int(row.get("uid", -1)), int(row.get("cuid", -1))):
                ident = row.get("shmid") or row.get("msqid") or row.get("semid")
                subprocess.run(["ipcrm", flag, str(ident)], capture_output=True, timeout=10)


def jobs_dir(workdir: Path, user: JobUser | None, base: Path | None = None) -> Path:
    """Where the runner that works in `workdir` makes its jobs' folders."""
    if user is None:
        return workdir / "jobs"
    workdir = workdir.resolve()
    key = hashlib.sha256(str(workdir).encode()).hexdigest()[:10]
    return (base or DEFAULT_JOBS_DIR) / f"{workdir.name}-{key}" / "jobs"


_RUNNER_FOLDER = re.compile(r".+-[0-9a-f]{10}")
OWNER = "workdir"  # in a runner's folder under the jobs base: the path of the runner folder it belongs to


def prepare_jobs_dir(path: Path, user: JobUser | None, workdir: Path) -> None:
    """Make the jobs' folder; for another user, it and the folders above it that we make can be passed through
    (not listed) by anyone; one above it that the job user cannot pass through is an error, said now. The
    folders under the jobs base of runner folders that are gone (a runner killed, its folder removed) go."""
    if user is None:
        path.mkdir(parents=True, exist_ok=True)
        return
    made = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in made:
        os.chmod(p, 0o711)
    for p in [path, *path.parents]:
        if not _may_enter(p, user):
            for q in made:  # children first: nothing of ours is left where jobs cannot go
                q.rmdir()
            raise JobUserError(f"the job user '{user.name}' cannot enter {p} (mode {p.stat().st_mode & 0o777:o}), "
                               f"on the way to the jobs' folders {path}; choose another --jobs-dir")
    (path.parent / OWNER).write_text(str(workdir.resolve()))
    link = workdir / "jobs"  # where they are, for whoever looks in the runner's folder (and removes it: `forget`)
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(path)
    for other in path.parent.parent.iterdir():
        try:  # a runner's folder: named as jobs_dir names them, root's, with its owner's path in it
            ours = other != path.parent and _RUNNER_FOLDER.fullmatch(other.name) and other.lstat().st_uid == 0
            gone = ours and (other / OWNER).lstat().st_uid == 0 and not Path((other / OWNER).read_text()).exists()
        except OSError:
            continue  # not one of ours, or being made
        if gone:
            try:
                remove_tree(other)
            except OSError:
                pass


def _may_enter(p: Path, user: JobUser) -> bool:
    st = p.stat()
    return bool(st.st_mode & 0o001 or (st.st_uid == user.uid and st.st_mode & 0o100)
                or (st.st_gid in user.groups and st.st_mode & 0o010))


def search_path(path: str, user: JobUser) -> str:
    """The runner's PATH as its job's user can use it: without the folders that user cannot reach (root's pyenv
    or conda), and without the runner's own virtual environment (dstack's packages are not the job's: its pip
    would install there, or fail on an interpreter out of reach)."""
    own = Path(sys.prefix) / "bin" if sys.prefix != sys.base_prefix else None
    kept = []
    for entry in path.split(os.pathsep):
        p = Path(entry)
        try:
            usable = p.is_absolute() and p != own and p.is_dir() and all(_may_enter(q, user) for q in [p, *p.parents])
        except OSError:
            usable = False
        if usable and entry not in kept:
            kept.append(entry)
    return os.pathsep.join(kept) or "/usr/bin:/bin"


def release_jobs_dir(path: Path, user: JobUser | None) -> None:
    """A runner leaves: the jobs' folder outside its own folder goes, unless another runner still uses it."""
    if user is None:
        return
    try:
        path.rmdir()
    except OSError:  # not empty: another runner of the same folder works in it
        return
    (path.parent / OWNER).unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def forget(workdir: Path) -> None:
    """The runner that worked in `workdir` is gone: its jobs' folder elsewhere (that `workdir/jobs` links to)
    goes, with whatever a killed runner left there."""
    link = workdir / "jobs"
    if link.is_symlink():
        target = Path(os.readlink(link))
        if target.name == "jobs" and (target.parent / OWNER).is_file():
            remove_tree(target.parent)
        link.unlink()


def job_folder(folder: Path, user: JobUser | None) -> None:
    """A job's folder: the runner's (the job may enter it, not change it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chmod(folder, 0o711)


def give(path: Path, user: JobUser | None) -> None:
    """Hand a folder the runner made for a job (its code, its home) to the job's user, files and all. A file with
    other links (a local clone's git objects, linked to the user's repository) keeps its owner: it is read-only,
    and the job reads it as it is."""
    if user is None:
        return
    # bottom-up, each entry through its folder's descriptor, never following a link: a folder becomes the user's
    # only once all in it is, so that no process of the user (one a job left behind) can swap a part of the
    # tree for a link to elsewhere while root walks it
    for _, dirs, files, dirfd in os.fwalk(path, topdown=False, follow_symlinks=False):
        for n in dirs + files:
            st = os.stat(n, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
                os.chown(n, user.uid, user.gid, dir_fd=dirfd, follow_symlinks=False)
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    if user.own:
        os.chmod(path, 0o700)  # a job's own: no other job's uid may enter it (its mounts show where it is)


def take_back(path: Path) -> None:
    """A job has ended: its folders become root's, writable by no one else, each through a descriptor opened
    without following links, so that no other uid (a job that this one let in, and that still runs) can change
    the tree while root saves its artifacts. Files keep their owner (a file's content is the job's to give)."""
    for _dirpath, _dirs, _files, dirfd in os.fwalk(path, follow_symlinks=False):  # each folder, by descriptor
        os.fchown(dirfd, 0, 0)
        os.fchmod(dirfd, stat.S_IMODE(os.fstat(dirfd).st_mode) & ~0o022)


def home(folder: Path, user: JobUser | None) -> Path | None:
    """The job's HOME, in its folder, when it runs as another user (none of whose own home is ours to use)."""
    if user is None:
        return None
    path = folder / "home"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    return path
