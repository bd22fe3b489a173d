"""Saved trees on a runner: build the tree of a manifest again (hard links where the blobs are on the
same disk, a runner-side cache of fetched blobs elsewhere: dstack.storage.cache), keep built trees for
reuse, remove and verify them. Saving is in dstack.storage.save."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dstack.core.errors import DstackError
from dstack.core.manifest import Entry, Manifest, UnsafePath, normalize_relative_path
from dstack.storage.blobstore import BlobStore
from dstack.storage.cache import BlobCache, copy_file
from dstack.storage.hashing import hash_fd


def artifact_source(job_root: Path, path: str) -> Path:
    """The folder of artifact `path` (as the workflow declares it) inside `job_root`. UnsafePath for
    absolute paths, `..`, and paths that lead outside the job's folder through symlinks."""
    rel = normalize_relative_path(path, f"artifact path '{path}'")
    root = Path(os.path.realpath(job_root))
    real = Path(os.path.realpath(root / rel))
    if real != root and root not in real.parents:
        raise UnsafePath(f"artifact '{path}' leads outside the job's folder (to {real})",
                         hint="artifacts must be folders inside the job's working folder")
    return real


# ---- build ----


def materialise(store: BlobStore, manifest: Manifest, dest: Path, cache: BlobCache | Path | None = None,
                *, read_only: bool = True, workers: int | None = None) -> None:
    """Build the tree of `manifest` at `dest` (which must not exist).

    `read_only` (a dependency): files are hard links to the store's blobs when they share a disk,
    else to blobs fetched once into `cache`; a copy only where no link can be made. Files are 0444,
    or 0555 where the manifest has an executable bit; folders 0555. Otherwise (a download): fresh
    copies with the manifest's exact modes. Every copy and fetch is verified against its hash.
    On failure nothing is left at `dest`."""
    dest = Path(dest)
    if isinstance(cache, (str, Path)):
        cache = BlobCache(Path(cache))
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        raise DstackError(f"cannot build the artifact at {dest}: it exists already") from None
    try:
        TreeBuilder(store, manifest, dest, cache, read_only, workers or store.concurrency).build()
    except BaseException:
        remove_tree(dest)
        raise


class TreeBuilder:
    """Builds (parts of) the tree of a manifest at `dest`, read-only or as plain copies."""

    def __init__(self, store: BlobStore, manifest: Manifest, dest: Path, cache: BlobCache | None,
                 read_only: bool, workers: int):
        self.store, self.manifest, self.dest, self.cache = store, manifest, dest, cache
        self.read_only, self.workers = read_only, workers
        dev = os.stat(dest).st_dev
        files = [e for e in manifest.entries if e.kind == "file" and e.size]
        probe = store.local_path(files[0].hash) if files else None  # type: ignore[arg-type]
        self.local = probe is not None
        self.link_store = read_only and probe is not None and _device(probe.parent) == dev
        self.link_cache = read_only and cache is not None and _device(cache.root) == dev
        # fetch into the cache when the store is remote, or local on another disk than the cache's
        self.fill_cache = cache is not None and not self.link_store and (not self.local or self.link_cache)
        self.files = files

    def build(self) -> None:
        dest = self.dest
        for e in self.manifest.entries:  # parents come before children
            if e.kind == "dir":
                os.mkdir(dest / e.path, 0o700)
            elif e.kind == "symlink":
                os.symlink(e.target, dest / e.path)  # type: ignore[arg-type]
            elif e.size == 0:
                fd = os.open(dest / e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
                os.close(fd)
                os.chmod(dest / e.path, self.mode(e))
        self.fill(self.files)
        for e in reversed(self.manifest.entries):  # children before parents: a 0555 folder is final
            if e.kind == "dir":
                os.chmod(dest / e.path, self.mode(e))
        os.chmod(dest, 0o555 if self.read_only else 0o755)

    def fill(self, files: list[Entry]) -> None:
        """Create the (non-empty) files `files` in their folders, which exist."""
        if self.fill_cache:
            self._parallel(lambda h: self.cache.ensure(self.store, h), sorted({e.hash for e in files}))
        todo = [e for e in files if not self._try_link(e)] if self.read_only else files
        self._parallel(self._copy, todo)

    def mode(self, e: Entry) -> int:
        if not self.read_only:
            return e.mode
        if e.kind == "dir":
            return 0o555
        return 0o555 if e.mode & 0o111 else 0o444

    def _parallel(self, fn, items: list) -> None:
        if self.workers <= 1 or len(items) <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dstack-fetch") as pool:
            for _ in pool.map(fn, items):
                pass

    def _try_link(self, e: Entry) -> bool:
        h = e.hash
        assert h is not None
        executable = bool(e.mode & 0o111)
        source = None
        if self.link_store:
            source = self.store.local_path(h)
        elif self.link_cache and self.fill_cache:
            source = self.cache.path(h)  # type: ignore[union-attr]
        if source is not None and executable:
            if not self.link_cache:
                return False
            source = self.cache.executable(source, h)  # type: ignore[union-attr]
        if source is None:
            return False
        try:
            os.link(source, self.dest / e.path)
            return True
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES):
                return False  # another disk, too many links, protected_hardlinks: copy instead
            raise

    def _copy(self, e: Entry) -> None:
        h = e.hash
        assert h is not None
        target = self.dest / e.path
        if self.cache is not None and self.cache.path(h).exists():
            copy_file(self.cache.path(h), target, self.mode(e))
        else:
            self.store.fetch(h, target)  # verified
            os.chmod(target, self.mode(e))


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def tree_cache(store: BlobStore, digest: str, trees_root: Path, cache: BlobCache | Path | None = None) -> Path:
    """A read-only folder holding the tree of manifest `digest`, built once per runner (atomically)
    and reused: mounting the same dependency again costs one stat. Bind-mount it read-only."""
    trees_root = Path(trees_root)
    final = trees_root / digest
    if final.is_dir():
        try:
            os.utime(final)  # mounted now: the last tree a bounded cache prunes
        except OSError:
            pass
        return final
    manifest = store.get_manifest(digest)
    trees_root.mkdir(parents=True, exist_ok=True)
    tmp = trees_root / f".tmp-{digest[:16]}-{uuid.uuid4().hex[:12]}"
    try:
        materialise(store, manifest, tmp, cache, read_only=True)
        os.rename(tmp, final)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
            remove_tree(tmp)
            raise
        remove_tree(tmp)  # another process built it first
    except BaseException:
        remove_tree(tmp)
        raise
    return final


def remove_tree(path: Path) -> None:
    """Delete a tree built read-only (its folders are 0555). Each folder is made writable through a descriptor
    opened without following links, so that a link swapped in meanwhile never makes another folder writable."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    _writable(str(path), None)
    for _dirpath, dirnames, _files, dirfd in os.fwalk(path, follow_symlinks=False):
        for d in dirnames:
            _writable(d, dirfd)
    shutil.rmtree(path)  # descriptor-based on Linux: it never follows a link


def _writable(name: str, dir_fd: int | None) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return  # a link, or gone: rmtree deals with it
    try:
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def verify_tree(manifest: Manifest, dest: Path) -> list[str]:
    """What differs between the tree at `dest` and `manifest` (empty: identical): missing or extra
    entries, kinds, sizes, content hashes, symlink targets, executable bits."""
    dest = Path(dest)
    problems = []
    expected = {e.path: e for e in manifest.entries}
    for rel, st in _walk(dest):
        e = expected.pop(rel, None)
        if e is None:
            problems.append(f"'{rel}' is not in the manifest")
            continue
        full = dest / rel
        if e.kind == "dir":
            if not stat.S_ISDIR(st.st_mode):
                problems.append(f"'{rel}' should be a folder")
        elif e.kind == "symlink":
            if not stat.S_ISLNK(st.st_mode):
                problems.append(f"'{rel}' should be a symlink")
            elif os.readlink(full) != e.target:
                problems.append(f"'{rel}' should point to '{e.target}', not '{os.readlink(full)}'")
        elif not stat.S_ISREG(st.st_mode):
            problems.append(f"'{rel}' should be a file")
        elif st.st_size != e.size:
            problems.append(f"'{rel}' has {st.st_size} bytes, not {e.size}")
        else:
            if bool(st.st_mode & 0o111) != bool(e.mode & 0o111):
                problems.append(f"'{rel}' should{'' if e.mode & 0o111 else ' not'} be executable")
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                got = hash_fd(fd, e.size)
            finally:
                os.close(fd)
            if got != e.hash:
                problems.append(f"'{rel}' has other content (hash {got[:12]}, not {e.hash[:12]})")  # type: ignore[index]
    problems.extend(f"'{rel}' is missing" for rel in expected)
    return problems


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    stack = [("", str(root))]
    while stack:
        base, folder = stack.pop()
        with os.scandir(folder) as it:
            listing = list(it)
        for e in listing:
            rel = f"{base}/{e.name}" if base else e.name
            st = e.stat(follow_symlinks=False)
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                stack.append((rel, e.path))
