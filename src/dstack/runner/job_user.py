"""Who runs a runner's host jobs, and where their folders are.

A runner that runs as root runs host jobs as an unprivileged user (`nobody` unless `--job-user` names
another), so that a job cannot read what its runner or the server keep on the machine: the server's token and
database, the runner's token, other jobs' folders. Such a user cannot enter root's folders (`/root` is 0700),
so the jobs' folders live under a folder it can pass through: `--jobs-dir` (default /var/lib/dstack-runner),
one subfolder per runner folder. In a job's folder the runner's own files stay root's; its code, and a home
folder (HOME), are the job user's. A runner that does not run as root runs jobs as itself, in its own folder.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from dstack.core.names import DEFAULT_JOB_USER as DEFAULT_USER
from dstack.storage.tree import remove_tree

DEFAULT_JOBS_DIR = Path("/var/lib/dstack-runner")


class JobUserError(Exception):
    pass


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def named(cls, name: str) -> JobUser:
        try:
            pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
        except KeyError:
            raise JobUserError(f"no user '{name}' on this machine (--job-user)") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))


def choose(name: str | None) -> JobUser | None:
    """The user that runs host jobs, when it is not the runner's own: `name`, else `nobody` for a root runner.
    None: jobs run as the runner does (it is not root, or `--job-user` names its own user)."""
    if name is not None and not name.strip():
        raise JobUserError("--job-user is empty: name a user of this machine (or leave the option out)")
    if os.geteuid() != 0:
        if name is not None and JobUser.named(name).uid != os.geteuid():
            raise JobUserError(f"only a runner that runs as root can run jobs as another user ('{name}'); "
                               "leave out --job-user")
        return None
    user = JobUser.named(name or DEFAULT_USER)
    return None if user.uid == 0 else user


def jobs_dir(workdir: Path, user: JobUser | None, base: Path | None = None) -> Path:
    """Where the runner that works in `workdir` makes its jobs' folders."""
    if user is None:
        return workdir / "jobs"
    workdir = workdir.resolve()
    key = hashlib.sha256(str(workdir).encode()).hexdigest()[:10]
    return (base or DEFAULT_JOBS_DIR) / f"{workdir.name}-{key}" / "jobs"


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
        try:
            gone = other != path.parent and not Path((other / OWNER).read_text()).exists()
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


def home(folder: Path, user: JobUser | None) -> Path | None:
    """The job's HOME, in its folder, when it runs as another user (none of whose own home is ours to use)."""
    if user is None:
        return None
    path = folder / "home"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    return path
