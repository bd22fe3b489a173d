"""Folders in and out of the store: save a job's folder as blobs plus a manifest, and build a saved
tree again on a runner (hard links where the blobs are on the same disk, a runner-side cache of
fetched blobs elsewhere).

Saving never follows a symlink, keeps at most `workers` files open, reads each file's data once
more than needed only for large files (hash, then an in-kernel copy when the store lacks the blob),
and puts the manifest last: a save that dies on the way leaves no artifact, only blobs and
temporary files that gc removes once they are past its grace period."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dstack.core.errors import DstackError, NotFound
from dstack.core.manifest import (
    EMPTY_HASH,
    Entry,
    Manifest,
    UnsafePath,
    check_symlinks,
    check_text,
    normalize_relative_path,
)
from dstack.storage.blobstore import BlobStore, file_identity
from dstack.storage.hashing import SMALL_FILE, IntegrityError, copy_fd, hash_bytes, hash_fd, read_exactly

log = logging.getLogger(__name__)

_BATCH = 64  # files per task of the thread pool (one task per file costs more than a small file)
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs us


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


# ---- save ----


def save_tree(store: BlobStore, src: Path, *, workers: int | None = None,
              warn: Callable[[str], None] | None = None) -> Manifest:
    """Save the folder `src` into `store`; return its manifest (already stored: the artifact exists).
    `workers`: threads for the files (default: what the store says pays off).

    Files the store has already are not stored again. Symlinks are saved as links and must resolve
    inside `src` (with `warn`, those that do not are left out and reported to it; else UnsafePath);
    FIFOs, sockets and devices are skipped with a warning."""
    src = Path(src)
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        raise NotFound(f"folder {src} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{src} is not a folder" + (" (it is a symlink)" if stat.S_ISLNK(st.st_mode) else ""))
    entries, files, kinds, targets = _scan(src)
    if warn is None:
        check_symlinks(kinds, targets)
    else:  # leave out the symlinks that lead outside, say so, and save the rest
        for rel in _escaping_symlinks(kinds, targets):
            warn(f"not saved: symlink '{rel}' points outside the artifact (to '{targets[rel]}')")
            del kinds[rel], targets[rel]
            entries = [e for e in entries if e.path != rel]
    workers = workers or store.concurrency
    batches = [files[i:i + _BATCH] for i in range(0, len(files), _BATCH)]
    saved: list[tuple[str, int, int, str]] = []
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            saved.extend(_save_files(store, batch))
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dstack-save") as pool:
            futures = [pool.submit(_save_files, store, batch) for batch in batches]
            try:
                for f in futures:
                    saved.extend(f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    # entries are made here, in one tight loop, not between file operations: that is ~2x faster
    entries.extend(Entry(path=rel, kind="file", mode=mode, size=size, hash=h) for rel, mode, size, h in saved)
    manifest = Manifest.build(entries)
    store.put_manifest(manifest)  # last: from here on the artifact exists
    return manifest


def _escaping_symlinks(kinds: dict[str, str], targets: dict[str, str]) -> list[str]:
    """The symlinks that resolve outside the root (until none is left: links may lead through links)."""
    kinds, targets, out = dict(kinds), dict(targets), []
    while True:
        bad = []
        for rel, target in targets.items():
            try:
                check_symlinks(kinds, {rel: target})
            except UnsafePath:
                bad.append(rel)
        if not bad:
            return out
        for rel in bad:
            del kinds[rel], targets[rel]
        out += bad


def _scan(src: Path) -> tuple[list[Entry], list[tuple[str, str]], dict[str, str], dict[str, str]]:
    """Directories and symlinks as entries, files as (relative, absolute) paths, one open folder at a time."""
    entries: list[Entry] = []
    files: list[tuple[str, str]] = []
    kinds: dict[str, str] = {}
    targets: dict[str, str] = {}
    stack = [("", str(src))]
    while stack:
        base, folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                listing = list(it)
        except OSError as e:
            raise DstackError(f"cannot read folder '{base or '.'}' of {src}: {e.strerror}") from None
        for e in listing:
            check_text(e.name, f"file name in '{base or '.'}'")
            rel = f"{base}/{e.name}" if base else e.name
            if e.is_symlink():
                target = os.readlink(e.path)
                check_text(target, f"target of symlink '{rel}'")
                targets[rel] = target
                kinds[rel] = "symlink"
                try:
                    entries.append(Entry(path=rel, kind="symlink", mode=0o777, target=target))
                except UnsafePath:
                    pass  # an absolute target: check_symlinks below refuses it (or leaves it out)
            elif e.is_dir(follow_symlinks=False):
                mode = e.stat(follow_symlinks=False).st_mode & 0o777
                kinds[rel] = "dir"
                entries.append(Entry(path=rel, kind="dir", mode=mode))
                stack.append((rel, e.path))
            elif e.is_file(follow_symlinks=False):
                kinds[rel] = "file"
                files.append((rel, e.path))
            else:
                log.warning("not saving '%s' of %s: not a file, folder or symlink", rel, src)
    return entries, files, kinds, targets


def _save_files(store: BlobStore, batch: list[tuple[str, str]]) -> list[tuple[str, int, int, str]]:
    return [_save_file(store, rel, path) for rel, path in batch]


def _save_file(store: BlobStore, rel: str, path: str) -> tuple[str, int, int, str]:
    """Store one file's content; (path, mode, size, hash) for its manifest entry."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IntegrityError(f"'{rel}' became a symlink while it was being saved") from None
        raise DstackError(f"cannot read '{rel}': {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"'{rel}' stopped being a regular file while it was being saved")
        size = st.st_size
        if size == 0:
            h = EMPTY_HASH
        elif size <= SMALL_FILE:  # read once: the blob is what was hashed, whatever the file does now
            data = read_exactly(fd, size)
            h = hash_bytes(data)
            if not store.has(h, touch=True):
                store.put_bytes(data, h, trusted=True)
        else:
            before = file_identity(st)

            def unchanged() -> None:
                if file_identity(os.fstat(fd)) != before:
                    raise IntegrityError(
                        f"'{rel}' changed while it was being saved",
                        hint="make sure no process of the job still writes to its artifacts when it ends",
                    )

            h = store.ingest(fd, size, unchanged)
        return rel, st.st_mode & 0o777, size, h
    finally:
        os.close(fd)


# ---- build ----


class BlobCache:
    """Blobs fetched from a remote store, on the runner's disk: <root>/<h[:2]>/<h> (0444), plus
    `<h>.x` (0555) for content that is linked as an executable. Written atomically, verified on
    fetch, so whatever is in it is right; safe to share between processes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, h: str, executable: bool = False) -> Path:
        return self.root / h[:2] / (f"{h}.x" if executable else h)

    def ensure(self, store: BlobStore, h: str) -> Path:
        """The cached blob; fetched once if absent."""
        p = self.path(h)
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            store.fetch(h, p)
        return p

    def executable(self, source: Path, h: str) -> Path:
        """A 0555 copy of blob `h` (from `source`), to hard-link where the manifest says +x."""
        p = self.path(h, executable=True)
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            _copy_file(source, p, 0o555, atomic=True)
        return p


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
        _Builder(store, manifest, dest, cache, read_only, workers or store.concurrency).build()
    except BaseException:
        remove_tree(dest)
        raise


class _Builder:
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
                os.chmod(dest / e.path, self._mode(e))
        if self.fill_cache:
            self._parallel(lambda h: self.cache.ensure(self.store, h), sorted(self.manifest.blobs()))
        if self.read_only:
            todo = [e for e in self.files if not self._try_link(e)]
        else:
            todo = self.files
        self._parallel(self._copy, todo)
        for e in reversed(self.manifest.entries):  # children before parents: a 0555 folder is final
            if e.kind == "dir":
                os.chmod(dest / e.path, self._mode(e))
        os.chmod(dest, 0o555 if self.read_only else 0o755)

    def _mode(self, e: Entry) -> int:
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
            _copy_file(self.cache.path(h), target, self._mode(e))
        else:
            self.store.fetch(h, target)  # verified
            os.chmod(target, self._mode(e))


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def _copy_file(src: Path, dst: Path, mode: int, atomic: bool = False) -> None:
    final = dst
    if atomic:
        dst = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.part")
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copy_fd(fin, out, os.fstat(fin).st_size)
            os.fchmod(out, mode)
        finally:
            os.close(out)
        if atomic:
            os.rename(dst, final)
    except BaseException:
        if atomic and dst.exists():
            dst.unlink()
        raise
    finally:
        os.close(fin)


def tree_cache(store: BlobStore, digest: str, trees_root: Path, cache: BlobCache | Path | None = None) -> Path:
    """A read-only folder holding the tree of manifest `digest`, built once per runner (atomically)
    and reused: mounting the same dependency again costs one stat. Bind-mount it read-only."""
    trees_root = Path(trees_root)
    final = trees_root / digest
    if final.is_dir():
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
    """Delete a tree built read-only (its folders are 0555)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for dirpath, dirnames, _files in os.walk(path):
        os.chmod(dirpath, 0o700)
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(path)


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
