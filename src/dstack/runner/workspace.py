"""A job's folder on the runner: its code, its dependencies, and its artifacts once it ends."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import IO

from dstack.core.errors import NotFound
from dstack.core.models import DependencyRef, JobSpec
from dstack.runner import job_user
from dstack.runner.executors.base import Mount
from dstack.runner.job_user import JobUser
from dstack.storage.blobstore import BlobStore
from dstack.storage.cache import BlobCache
from dstack.storage.save import save_tree
from dstack.storage.tree import artifact_source, remove_tree, tree_cache

log = logging.getLogger("dstack.runner")


class WorkspaceError(Exception):
    pass


def job_path(job: JobSpec, path: str) -> str:
    """A path of the workflow (relative to its working dir) as a path relative to the job's root."""
    return os.path.normpath(os.path.join(job.working_dir, path))


IN_USE = "trees-in-use"  # beside the job's code folder: the dependency trees it mounts, one digest a line


def _dependency_target(job: JobSpec, dep: DependencyRef, path: str) -> str:
    """Where a dependency's artifact appears: under its `into` folder, else at its own path (absolute ones too)."""
    if dep.into:
        return job_path(job, posixpath.join(dep.into, path.lstrip("/")))
    return path if path.startswith("/") else job_path(job, path)


def dependency_mounts(job: JobSpec, root: Path, store: BlobStore, trees: Path, cache: BlobCache,
                      binds: bool = True) -> list[Mount]:
    """Each dependency artifact as a read-only folder to mount at its path: built once per manifest
    (hard links to the store's blobs when it is on this disk, else to blobs fetched into `cache`).
    A path that leads outside the job's folder through a symlink of the code is refused; an absolute one needs an
    executor that `binds` anywhere (a container; a root runner's namespace). The trees are recorded beside the
    job's code (`trees_in_use`), so that pruning the cache leaves them while it runs."""
    digests = [d for dep in job.dependencies for d in dep.manifests.values()]
    (root.parent / IN_USE).write_text("".join(f"{d}\n" for d in digests))
    mounts = []
    for dep in job.dependencies:
        for path in dep.artifacts:
            target = _dependency_target(job, dep, path)
            if target.startswith("/") and not binds:
                raise WorkspaceError(f"artifact '{path}' of {dep.run_name} ({dep.ref}) is mounted at its absolute "
                                     "path, which a job on this runner's host cannot have: give the workflow an "
                                     "`image`, or run the runner as root (it mounts it in the job's namespace)")
            if not target.startswith("/"):
                artifact_source(root, target)  # raises UnsafePath when it escapes
            digest = dep.manifests.get(path)
            if digest is None:
                raise WorkspaceError(f"artifact '{path}' of {dep.run_name} ({dep.ref}) has no manifest")
            try:
                src = tree_cache(store, digest, trees, cache)
            except NotFound:
                raise WorkspaceError(f"artifact '{path}' of {dep.run_name} ({dep.ref}) is missing from the "
                                     "store (pruned?)") from None
            mounts.append(Mount(source=src, target=target, read_only=True))
    return mounts


def output_mounts(job: JobSpec, folder: Path, binds: bool, user: JobUser | None) -> tuple[list[Mount], dict[str, Path]]:
    """The job's absolute artifacts (`/opt/conda/envs/train`) and the folders they are saved from. Where the
    executor `binds` anywhere (a container; a root runner's namespace), a folder of the job's own
    (`folder/outputs/N`) is mounted at the path; a runner whose jobs run as itself, with no namespace, saves the
    path itself, where the job wrote. Any other runner (root, jobs as other users, no namespace) refuses: it would
    read the machine's files for the job with its own rights."""
    mounts, sources = [], {}
    for i, path in enumerate(p for p in job.artifacts if p.startswith("/")):
        _check_absolute(path, "artifact")
        if binds:
            source = folder / "outputs" / str(i)
            source.mkdir(parents=True, exist_ok=True)
            _hand_over(folder / "outputs", source, job, user)
            mounts.append(Mount(source=source, target=path, read_only=False))
            sources[path] = source
        elif user is None:
            sources[path] = Path(path)
        else:
            raise WorkspaceError(f"artifact '{path}' is absolute, which a job on this runner's host cannot have: "
                                 "its runner runs jobs as other users and cannot make mount namespaces; give the "
                                 "workflow an `image`, or save a folder of its working_dir")
    return mounts, sources


def distinct(mounts: list[Mount]) -> list[Mount]:
    """`mounts`, none at a place another has (an absolute artifact that is also a dependency's, say)."""
    seen: dict[str, Mount] = {}
    for m in mounts:
        if m.target in seen:
            raise WorkspaceError(f"two folders would be mounted at '{m.target}' (an artifact, a dependency's "
                                 "artifact or a cache at one path): give them different paths, or a dependency "
                                 "`into: FOLDER`")
        seen[m.target] = m
    return mounts


def _check_absolute(path: str, what: str) -> None:
    """What the server checked, checked again where it matters (the runner takes no path on trust)."""
    if posixpath.normpath(path) != path or path in ("/", "~") or path.startswith(("/proc", "/sys", "/dev")):
        raise WorkspaceError(f"{what} '{path}' is not a folder a job may have")


def _hand_over(parent: Path, folder: Path, job: JobSpec, user: JobUser | None) -> None:
    """A folder the runner made for the job to write in: its user's on the host; in a container (whose user may be
    anyone the image says), writable by all, in a `parent` that only root may enter."""
    if job.image:
        os.chmod(parent, 0o700)
        os.chmod(folder, 0o777)
    else:
        job_user.give(folder, user)


def cache_mounts(job: JobSpec, folder: Path, caches: Path, binds: bool,
                 user: JobUser | None, root: Path | None = None) -> tuple[list[Mount], list[IO], list[str]]:
    """The workflow's `cache:` folders, kept between its runs on this runner (per project and workflow, in
    `caches`), each mounted read-write at its path (`~/` is the job's home). A job on the host of a runner with no
    namespace: a relative or `~/` one is a symlink to the kept folder; an absolute one (or `~/` of the runner's
    own user) is the path itself, which stays anyway. A folder that another job uses now is not shared: this job
    gets an empty one (said in `notes`). Returns the mounts, the locks to hold while the job runs, the notes."""
    mounts, locks, notes = [], [], []
    try:
        for path in job.cache:
            _cache_mount(job, path, folder, caches, binds, user, root, mounts, locks, notes)
    except BaseException:
        for lock in locks:
            lock.close()
        raise
    return mounts, locks, notes


def _cache_mount(job: JobSpec, path: str, folder: Path, caches: Path, binds: bool, user: JobUser | None,
                 root: Path | None, mounts: list[Mount], locks: list[IO], notes: list[str]) -> None:
    if path.startswith("/"):
        _check_absolute(path, "cache")
    elif path.startswith("~/"):
        _check_absolute("/" + path[2:], "cache")
    elif root is not None:
        artifact_source(root, job_path(job, path))  # raises UnsafePath when a link of the code leads out
    if not binds and (path.startswith("/") or (path.startswith("~/") and user is None)):
        if user is not None:
            raise WorkspaceError(f"cache '{path}' is absolute, which a job on this runner's host cannot have: its "
                                 "runner runs jobs as other users and cannot make mount namespaces; give the "
                                 "workflow an `image`, or cache a folder of its working_dir or home")
        return  # the runner's own user's folder: it stays between runs
    key = hashlib.sha256(f"{job.repo_id}\0{job.workflow}\0{path}".encode()).hexdigest()[:20]
    caches = caches / ("image" if job.image else "host")  # a container's are writable by all: only root enters
    caches.mkdir(mode=0o700 if job.image else 0o711, parents=True, exist_ok=True)
    lock = open(caches / f"{key}.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        source = folder / "cache" / key
        notes.append(f"cache '{path}' is in use by another job of {job.workflow} on this runner: this job "
                     "starts with an empty one, which is not kept")
    else:
        locks.append(lock)
        source = caches / key
    source.mkdir(parents=True, exist_ok=True)
    _hand_over(source.parent, source, job, user)
    target = path if path.startswith(("/", "~/")) else job_path(job, path)
    mounts.append(Mount(source=source, target=target, read_only=False))


def save_artifacts(job: JobSpec, root: Path, folder: Path, absolute: dict[str, Path], store: BlobStore, *,
                   adopt: bool, trees: Path, cache: BlobCache, ended_early: bool,
                   say: Callable[[bytes], None]) -> tuple[list[dict], list[str]]:
    """Save the ended job's artifacts (from `root`'s working dir, or `absolute`: output_mounts), saying in its log
    (`say`) what is not saved and why. A job that failed or was stopped (`ended_early`) before it made a folder saves
    nothing for it, not an empty artifact that would pass for its output. The job's folder goes next, so its files
    may become the store's blobs (`adopt`) and a folder the dependency tree (in `trees`), unless another artifact
    lies inside it or around it; a folder of the machine's own is read, never adopted. Returns the saved artifacts
    and the paths that were files, not folders."""
    artifacts, not_folders = [], []
    sources = {path: absolute.get(path) or artifact_source(root / job.working_dir, path) for path in job.artifacts}
    for path in job.artifacts:
        src = sources[path]
        if src.exists() and not src.is_dir():
            not_folders.append(path)
            say(f"dstack: artifact '{path}' is a file, not a folder: not saved\n".encode())
            continue
        unwritten = not src.exists() or (src.parent == folder / "outputs" and not any(src.iterdir()))
        if unwritten and ended_early:
            say(f"dstack: artifact '{path}' was not created by the job: nothing saved\n".encode())
            continue
        if not src.exists():
            say(f"dstack: artifact '{path}' was not created by the job; saved as an empty folder\n".encode())
            src = folder / "empty"
            src.mkdir(exist_ok=True)

        def warn(message: str, path: str = path) -> None:
            say(f"dstack: artifact '{path}': {message}\n".encode())

        shared = src == Path(path) or any(p != path and (o.is_relative_to(src) or src.is_relative_to(o))
                                           for p, o in sources.items())
        manifest = save_tree(store, src, adopt=adopt and not shared, trees=None if shared else trees, cache=cache,
                             warn=warn)
        artifacts.append({"path": path, "manifest": manifest.digest(), "files": manifest.files,
                          "size": manifest.size})
    return artifacts, not_folders


def trees_in_use(jobs_dir: Path) -> set[str]:
    """The dependency trees that the jobs in the runner's jobs folder mount (its own and those of runners sharing
    it)."""
    found: set[str] = set()
    for record in jobs_dir.glob(f"*/{IN_USE}"):
        try:
            found |= set(record.read_text().split())
        except OSError:  # its job ended just now
            continue
    return found


def use_workdir(workdir: Path, jobs_dir: Path, user: JobUser | None = None):
    """Take the runner's folder: a lock shared by the runners that use it, held for the runner's lifetime (the
    returned file). The first runner to use it since all others ended (killed, crashed) first removes the job
    folders they left (in `jobs_dir`, which is made here: runner/job_user.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_user.prepare_jobs_dir(jobs_dir, user, workdir)
    lock = open(workdir / "runner.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # another runner works here: its folders are its own
    else:
        for left in sorted(jobs_dir.glob("*")):
            log.info("removing %s, left by a runner that did not end cleanly", left)
            remove(left)
    fcntl.flock(lock, fcntl.LOCK_SH)
    return lock


def remove(root: Path) -> None:
    """Delete a job's folder (read-only dependency copies included); a failure is logged, never raised."""
    try:
        remove_tree(root)
    except OSError as e:
        log.warning("could not remove %s: %s", root, e)
