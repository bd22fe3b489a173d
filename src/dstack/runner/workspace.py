"""A job's folder on the runner: its code, its dependencies, and its artifacts once it ends."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from dstack.core.errors import NotFound
from dstack.core.models import JobSpec
from dstack.runner import job_user
from dstack.runner.executors.base import Mount
from dstack.runner.job_user import JobUser
from dstack.storage.blobstore import BlobStore
from dstack.storage.cache import BlobCache
from dstack.storage.tree import artifact_source, remove_tree, tree_cache

log = logging.getLogger("dstack.runner")


class WorkspaceError(Exception):
    pass


def job_path(job: JobSpec, path: str) -> str:
    """A path of the workflow (relative to its working dir) as a path relative to the job's root."""
    return os.path.normpath(os.path.join(job.working_dir, path))


IN_USE = "trees-in-use"  # beside the job's code folder: the dependency trees it mounts, one digest a line


def dependency_mounts(job: JobSpec, root: Path, store: BlobStore, trees: Path, cache: BlobCache) -> list[Mount]:
    """Each dependency artifact as a read-only folder to mount at its path: built once per manifest
    (hard links to the store's blobs when it is on this disk, else to blobs fetched into `cache`).
    A path that leads outside the job's folder through a symlink of the code is refused. The trees are
    recorded beside the job's code (`trees_in_use`), so that pruning the cache leaves them while it runs."""
    digests = [d for dep in job.dependencies for d in dep.manifests.values()]
    (root.parent / IN_USE).write_text("".join(f"{d}\n" for d in digests))
    mounts = []
    for dep in job.dependencies:
        for path in dep.artifacts:
            artifact_source(root, job_path(job, path))  # raises UnsafePath when it escapes
            digest = dep.manifests.get(path)
            if digest is None:
                raise WorkspaceError(f"artifact '{path}' of {dep.run_name} ({dep.ref}) has no manifest")
            try:
                src = tree_cache(store, digest, trees, cache)
            except NotFound:
                raise WorkspaceError(f"artifact '{path}' of {dep.run_name} ({dep.ref}) is missing from the "
                                     "store (pruned?)") from None
            mounts.append(Mount(source=src, target=job_path(job, path), read_only=True))
    return mounts


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
