"""Saving a job's folder into the store: a blob per distinct file content, then the manifest.

Saving never follows a symlink, keeps at most `workers` files open, and puts the manifest last: a
save that dies on the way leaves no artifact, only blobs and temporary files that gc removes once
they are past its grace period.

On a local store on the same disk, a runner saves a finished job's folder without copying it:

- **adopt**: a file that nothing else can reach becomes the blob itself, by a hard link, read-only
  from then on; saving it costs one read (the hash). "Nothing else": one link, not executable, and
  sealed: made read-only and the runner's (so no new writer gets past the permission check, and
  the job's user cannot change the blob), then a write lease (F_SETLEASE) is taken, which the kernel
  grants only while no other descriptor of the file is open anywhere. Someone who starts to open the
  file afterwards waits for the lease; the lease is checked again once the blob is linked, and the
  blob is taken back if it broke. Anything else (linked elsewhere, still open, not the runner's to
  change) is copied as before. Nested artifacts are not adopted (their modes must stay as the job
  left them for the artifact saved next).
- **identity**: the hash of an adopted file is kept in an extended attribute with the file's size
  and mtime. Saving it again (a tree saved as part of another artifact) reads nothing
  when the attribute still matches and the file is that blob's own inode. The attribute alone is
  never trusted: a job could write one that names content it cannot read.
- **plant**: the saved folder itself becomes the read-only tree of its manifest that dependency
  mounts reuse (`trees/<digest>`): moved there, not rebuilt. Files that are not the blob's own
  inode (deduplicated, copied, executable) are replaced by the tree's usual links or copies, and
  what the manifest left out (symlinks that lead outside or loop, FIFOs) is removed."""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import signal
import stat
import struct
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from dstack.core.errors import DstackError, NotFound
from dstack.core.manifest import (
    EMPTY_HASH,
    LOOP,
    MAX_SYMLINK_HOPS,
    Entry,
    Manifest,
    UnsafePath,
    check_text,
    unresolved_symlinks,
)
from dstack.storage.blobstore import TOUCH_AFTER, BlobStore, LocalBlobStore, file_identity
from dstack.storage.cache import BlobCache
from dstack.storage.hashing import SMALL_FILE, IntegrityError, hash_bytes, hash_fd, read_exactly
from dstack.storage.tree import TreeBuilder, remove_tree

log = logging.getLogger(__name__)

HASH_XATTR = "user.dstack.b3"  # the BLAKE3 of the content, then size and mtime (ns)
_BATCH = 64  # files per task of the thread pool (one task per file costs more than a small file)
_GIVE_UP_AFTER = 64
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs us
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)


class SavedFile(NamedTuple):
    path: str
    mode: int
    size: int
    hash: str
    is_blob: bool  # the file is the blob's own inode (adopted, or saved before)
    ino: int = 0  # its inode number, when is_blob


def save_tree(store: BlobStore, src: Path, *, adopt: bool = False, trees: Path | None = None,
              cache: BlobCache | Path | None = None, workers: int | None = None,
              warn: Callable[[str], None] | None = None) -> Manifest:
    """Save the folder `src` into `store`; return its manifest (already stored: the artifact exists).
    `workers`: threads for the files (default: what the store says pays off).

    Files the store has already are not stored again. Symlinks are saved as links (chains and links to
    folders too) and must resolve inside `src`: those that lead outside, and loops, are left out and
    reported to `warn` (without it, UnsafePath); FIFOs, sockets and devices are skipped with a warning.

    `adopt` (a finished job's folder, which is deleted afterwards): files nothing else reaches become
    blobs by hard link, read-only, where the store is a local folder on the same disk. With `trees`
    as well, `src` is moved to `trees/<digest>` as the manifest's read-only tree (unless one is there
    already, or it cannot move; `cache` as for tree_cache): the caller removes what is left."""
    src = Path(src)
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        raise NotFound(f"folder {src} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{src} is not a folder" + (" (it is a symlink)" if stat.S_ISLNK(st.st_mode) else ""))
    entries, files, kinds, targets = _scan(src)
    left_out = _unresolved_symlinks(kinds, targets, warn)
    if left_out:
        entries = [e for e in entries if e.path not in left_out]
    saver = _Saver(store, adopt, st.st_dev)
    workers = workers or store.concurrency
    batches = [files[i:i + _BATCH] for i in range(0, len(files), _BATCH)]
    saved: list[SavedFile] = []
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            saved.extend(saver.save_batch(batch))
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dstack-save") as pool:
            futures = [pool.submit(saver.save_batch, batch) for batch in batches]
            try:
                for f in futures:
                    saved.extend(f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    # entries are made here, in one tight loop, not between file operations: that is ~2x faster
    # unvalidated: each path is made of names read from the folder (check_text), each hash is ours; the
    # manifest still checks its structure
    new = Entry.saved_file
    entries.extend(new(s.path, s.mode, s.size, s.hash) for s in saved)
    manifest = Manifest.build(entries)
    store.put_manifest(manifest)  # last: from here on the artifact exists
    if trees is not None and saver.adopt:
        plant_tree(store, src, manifest, {s.path: s.ino for s in saved if s.is_blob}, Path(trees), cache)
    return manifest


def _unresolved_symlinks(kinds: dict[str, str], targets: dict[str, str],
                         warn: Callable[[str], None] | None) -> set[str]:
    """The symlinks to leave out: those that lead outside the folder, and loops (which lead nowhere),
    each reported to `warn`; without `warn`, UnsafePath for the first. The others are unaffected: a
    link whose way passes through one of these is one of these itself."""
    unresolved = unresolved_symlinks(kinds, targets)
    for rel, r in unresolved.items():
        via = f", through '{r.path}'" if r.path != rel else ""
        if r.fate == LOOP:
            why = (f"it never resolves (to '{targets[rel]}'{via}): a loop of symlinks, or more than "
                   f"{MAX_SYMLINK_HOPS} on the way")
        else:
            why = f"it points outside the artifact (to '{targets[rel]}'{via})"
        if warn is None:
            raise UnsafePath(f"symlink '{rel}' {why.removeprefix('it ')}",
                             hint="remove the link, or point it at a file or folder" if r.fate == LOOP else
                             "artifacts may hold only links to their own files; copy the target into the folder")
        warn(f"symlink '{rel}' left out (the rest is saved): {why}")
    return set(unresolved)


def _scan(src: Path) -> tuple[list[Entry], list[tuple[str, str, int | None]], dict[str, str], dict[str, str]]:
    """Directories and symlinks as entries, files as (relative path, absolute path, inode number: None
    below a folder on another filesystem than `src`), one open folder at a time."""
    entries: list[Entry] = []
    files: list[tuple[str, str, int | None]] = []
    kinds: dict[str, str] = {}
    targets: dict[str, str] = {}
    root_dev = os.lstat(src).st_dev
    stack = [("", str(src), True)]
    while stack:
        base, folder, same_fs = stack.pop()
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
                    pass  # an absolute target: _unresolved_symlinks refuses it (or leaves it out)
            elif e.is_dir(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                kinds[rel] = "dir"
                entries.append(Entry(path=rel, kind="dir", mode=st.st_mode & 0o777))
                stack.append((rel, e.path, same_fs and st.st_dev == root_dev))
            elif e.is_file(follow_symlinks=False):
                kinds[rel] = "file"
                files.append((rel, e.path, e.inode() if same_fs else None))
            else:
                log.warning("not saving '%s' of %s: not a file, folder or symlink", rel, src)
    return entries, files, kinds, targets


class _Saver:
    def __init__(self, store: BlobStore, adopt: bool, src_dev: int):
        self.store = store
        self.local = store if isinstance(store, LocalBlobStore) else None
        self.store_dev = os.stat(self.local.blobs).st_dev if self.local is not None else None
        self.adopt = adopt and self.local is not None and _leases_enabled()
        self.same_fs = src_dev == self.store_dev  # the folder is on the store's filesystem
        # A job's fresh output has no remembered hashes, a tree saved again has them on every file:
        # after this many files without one in a row, stop asking (the slow path still recognises a
        # blob's own inode by its hash, only slower)
        self.misses = 0

    def save_batch(self, batch: list[tuple[str, str, int | None]]) -> list[SavedFile]:
        return [self.save(rel, path, ino) for rel, path, ino in batch]

    def save(self, rel: str, path: str, ino: int | None = None) -> SavedFile:
        """Store one file's content; its manifest entry's fields. `ino`: its inode number as the folder
        listed it (None: unknown, or on another filesystem than the folder)."""
        if ino is not None and self.same_fs and self.misses < _GIVE_UP_AFTER:
            try:
                value = os.getxattr(path, HASH_XATTR, follow_symlinks=False)
            except OSError:
                self.misses += 1
            else:
                self.misses = 0
                saved = self._saved_before(rel, value, ino)
                if saved is not None:
                    return saved
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
            mode, size = st.st_mode & 0o777, st.st_size
            if size == 0:
                return SavedFile(rel, mode, 0, EMPTY_HASH, False)
            # executables are copied: blobs are 0444, and a tree links 0555 copies of them
            if (self.adopt and st.st_nlink == 1 and not mode & 0o111 and st.st_dev == self.store_dev
                    and _seal(fd, st)):
                return self._adopt(rel, fd, st)  # closing the file releases the lease
            h = self._store(rel, fd, st)
            if self.local is not None and st.st_nlink > 1:  # a blob's inode whose remembered hash is stale
                blob = _stat_blob(self.local, h)
                if blob is not None and (blob.st_dev, blob.st_ino) == (st.st_dev, st.st_ino):
                    remember_hash(fd, h, blob.st_size, blob.st_mtime_ns)
                    return SavedFile(rel, mode, size, h, True, st.st_ino)
            return SavedFile(rel, mode, size, h, False)
        finally:
            os.close(fd)

    def _saved_before(self, rel: str, value: bytes, ino: int) -> SavedFile | None:
        """A file that is a blob's own inode (saved before) and carries that blob's hash (`value`, its
        attribute), unchanged since: saved without reading it. Two calls: the attribute, and the
        blob's status, which is the file's own when the inode numbers match (same filesystem: the
        caller knows)."""
        if len(value) != 48:
            return None
        h = value[:32].hex()
        blob = _stat_blob(self.local, h, touch=True)  # type: ignore[arg-type]
        if blob is None or blob.st_ino != ino or value[32:] != _stamp(blob.st_size, blob.st_mtime_ns):
            return None
        return SavedFile(rel, blob.st_mode & 0o777, blob.st_size, h, True, ino)

    def _adopt(self, rel: str, fd: int, st: os.stat_result) -> SavedFile:
        """The file is ours alone and sealed (see _seal): hash it, and make it the blob unless the store
        has that content already. Anything the kernel will not let us link is copied; the lease must
        still hold once the blob is linked."""
        mode, size = st.st_mode & 0o777, st.st_size  # the mode the job gave it, before the seal
        if size <= SMALL_FILE:  # the lease keeps writers out while it is read: no need to look again
            h = hash_bytes(read_exactly(fd, size))
        else:  # a lease is broken by force after lease-break-time (45 s): look again after long reads
            sealed = os.fstat(fd)
            h = hash_fd(fd, size)
            _check_unchanged(rel, fd, sealed)
        local = self.local
        assert local is not None
        try:
            mtime = st.st_mtime_ns
            if not 0 <= time.time() - mtime / 1e9 <= TOUCH_AFTER:  # fresh for gc's grace (a future time too)
                mtime = time.time_ns()
                os.utime(fd, ns=(mtime, mtime))
            remember_hash(fd, h, size, mtime)
            linked = local.adopt(fd, h)
        except FileExistsError:  # the store has this content: nothing to store
            if local.has(h, touch=True):
                return SavedFile(rel, mode, size, h, False)
            linked = False  # gc took it meanwhile
        except OSError:
            linked = False
        if linked and not _lease_holds(fd):  # someone is opening it: it must not stay the blob
            local.unlink_if(h, st)
            linked = False
        if linked:
            return SavedFile(rel, mode, size, h, True, st.st_ino)
        local.put_file(fd, h, size)  # the kernel refused the link: copy
        return SavedFile(rel, mode, size, h, False)

    def _store(self, rel: str, fd: int, st: os.stat_result) -> str:
        size = st.st_size
        if size <= SMALL_FILE:  # read once: the blob is what was hashed, whatever the file does now
            data = read_exactly(fd, size)
            h = hash_bytes(data)
            if not self.store.has(h, touch=True):
                self.store.put_bytes(data, h, trusted=True)
            return h
        return self.store.ingest(fd, size, lambda: _check_unchanged(rel, fd, st))


def _check_unchanged(rel: str, fd: int, before: os.stat_result) -> None:
    if file_identity(os.fstat(fd)) != file_identity(before):
        raise IntegrityError(
            f"'{rel}' changed while it was being saved",
            hint="make sure no process of the job still writes to its artifacts when it ends",
        )


# ---- the hash kept on the file ----


def _stamp(size: int, mtime_ns: int) -> bytes:
    return struct.pack("<QQ", size, mtime_ns)


def remember_hash(fd: int, h: str, size: int, mtime_ns: int) -> None:
    """Keep `h` on the file, with its size and mtime now: 48 bytes, which ext4 keeps inside the inode.
    Best effort: a filesystem without user xattrs, or a file we may not write, just keeps nothing."""
    try:
        os.setxattr(fd, HASH_XATTR, bytes.fromhex(h) + _stamp(size, mtime_ns))
    except OSError:
        pass


# ---- leases: "nobody else has this file open" ----


@functools.cache
def _leases_enabled() -> bool:
    try:
        with open("/proc/sys/fs/leases-enable") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _seal(fd: int, st: os.stat_result) -> bool:
    """Make the file read-only and owned by us, then take a write lease on it: granted only while no
    other descriptor of the file is open anywhere (a writable mmap included). Read-only first, so
    that nobody opens it for writing between the lease and the link (the permission check comes
    before the lease's wait); ours, so that the blob is not writable by the job's user. Someone who
    opens it meanwhile waits for the lease; _lease_holds tells. The kernel signals the holder then:
    SIGURG, ignored by default, instead of SIGIO, which kills. False (the mode put back): copy."""
    try:
        if st.st_uid != os.geteuid():
            os.fchown(fd, os.geteuid(), os.getegid())
        os.fchmod(fd, 0o444)
    except OSError:  # not ours to change: copy it
        return False
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_WRLCK)
        return True
    except OSError:  # EAGAIN: open elsewhere; EACCES: not ours; EINVAL: no leases on this filesystem
        try:
            os.fchmod(fd, st.st_mode & 0o7777)
        except OSError:
            pass
        return False


def _lease_holds(fd: int) -> bool:
    """Still leased: nobody has started to open the file (a pending break reads as F_UNLCK)."""
    try:
        return fcntl.fcntl(fd, _F_GETLEASE) == fcntl.F_WRLCK
    except OSError:
        return False


def _stat_blob(store: LocalBlobStore, h: str, touch: bool = False) -> os.stat_result | None:
    try:
        return store.stat_blob(h, touch=touch)
    except OSError:  # e.g. another user's store: treat as unknown, the slow path decides
        return None


# ---- plant: the saved folder becomes its manifest's tree ----


def plant_tree(store: BlobStore, src: Path, manifest: Manifest, blob_files: dict[str, int], trees: Path,
               cache: BlobCache | Path | None = None) -> Path | None:
    """Move the saved folder `src` to `trees/<digest>` and make it exactly the read-only tree of
    `manifest` (what tree_cache would build). `blob_files`: files that are their blob's own inode
    already (path -> inode number). Returns the tree, or None where `src` cannot move there
    (another disk, not ours); a failure is logged, never raised: the artifact is saved either way."""
    digest = manifest.digest()
    final = trees / digest
    if final.is_dir():
        return final
    tmp = trees / f".tmp-{digest[:16]}-{uuid.uuid4().hex[:12]}"
    try:
        trees.mkdir(parents=True, exist_ok=True)
        os.rename(src, tmp)
    except OSError as e:
        log.info("not planting the tree of %s (%s): it will be built when it is mounted", src, e)
        return None
    try:
        if isinstance(cache, (str, Path)):
            cache = BlobCache(Path(cache))
        builder = TreeBuilder(store, manifest, tmp, cache, read_only=True, workers=store.concurrency)
        _own_folder(tmp)
        builder.fill(_reshape(tmp, manifest, blob_files, builder))
        for e in reversed(manifest.entries):  # children before parents
            if e.kind == "dir":
                os.chmod(tmp / e.path, 0o555)
        os.chmod(tmp, 0o555)
        os.rename(tmp, final)
        return final
    except Exception as e:
        if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
            _remove_quietly(tmp)  # another runner planted it first
            return final
        log.warning("could not plant the tree of %s: %s; it will be built when it is mounted", src, e)
        _remove_quietly(tmp)
        return None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _own_folder(path: Path | str) -> None:
    """A folder of the tree: ours (the job's user may not change it) and writable by us for now."""
    st = os.lstat(path)
    if st.st_uid != os.geteuid():
        os.lchown(path, os.geteuid(), os.getegid())
    os.chmod(path, 0o700)


def _remove_quietly(path: Path) -> None:
    try:
        remove_tree(path)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


def _reshape(root: Path, manifest: Manifest, blob_files: dict[str, int], builder: TreeBuilder) -> list[Entry]:
    """Make the tree at `root` hold exactly the manifest's entries: remove what it leaves out and the
    files that are not their blob's own inode (someone else may still write those), create what is
    missing (empty files afresh). Returns the non-empty files to link or copy in."""
    expected = {e.path: e for e in manifest.entries}
    kept = set()
    stack = [("", str(root))]
    while stack:
        base, folder = stack.pop()
        with os.scandir(folder) as it:
            listing = list(it)
        for d in listing:
            rel = f"{base}/{d.name}" if base else d.name
            e = expected.get(rel)
            if d.is_symlink():
                keep = e is not None and e.kind == "symlink" and os.readlink(d.path) == e.target
            elif d.is_dir(follow_symlinks=False):
                keep = e is not None and e.kind == "dir"
                if keep:
                    _own_folder(d.path)
                    stack.append((rel, d.path))
            else:  # the very inode that was saved and is the blob (not one put there since)
                keep = e is not None and e.kind == "file" and blob_files.get(rel) == d.inode()
            if keep:
                kept.add(rel)
            else:
                remove_tree(Path(d.path))
    missing = []
    for e in manifest.entries:  # parents before children
        if e.path in kept:
            continue
        path = root / e.path
        if e.kind == "dir":
            os.mkdir(path, 0o700)
        elif e.kind == "symlink":
            os.symlink(e.target, path)  # type: ignore[arg-type]
        elif e.size:
            missing.append(e)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            os.chmod(path, builder.mode(e))
    return missing
