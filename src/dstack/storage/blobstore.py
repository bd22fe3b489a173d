"""Where blobs and manifests live: the interface, the local folder backend, and the hashing and
copying they share.

A blob is the content of one file, named by its BLAKE3 hash and never changed. A manifest
(dstack.core.manifest) names the blobs of one artifact; putting it is what makes the artifact
exist, so it is always written last. Every write appears whole or not at all: an unnamed file
linked into place, a temporary name renamed, or (S3) a PUT / a completed multipart upload.

Local layout (default: DSTACK_HOME/storage):
    blobs/<h[:2]>/<h>        read-only (0444) files
    manifests/<digest>.json  the manifest's canonical JSON, read-only
    hints/<fingerprint>      "this large content is probably stored": picks how to save a large file
    tmp/                     unfinished writes where O_TMPFILE is missing; removed by gc once stale"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from blake3 import blake3

from dstack.core.errors import DstackError, NotFound
from dstack.core.manifest import Manifest

CHUNK = 4 << 20  # bytes per read/hash/copy step
SMALL_FILE = 4 << 20  # files up to this size are read into memory once (hash and write from there)
SPECULATE = 16 << 20  # local store: files from this size on may be copied while they are hashed
_THREADED_HASH = 64 << 20  # above this, BLAKE3 hashes with several threads where there are cores
_FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, XFS, bcachefs); ext4 says no
_ZEROS = memoryview(bytes(CHUNK))
TOUCH_AFTER = 600.0  # seconds: `has(touch=True)` renews a blob's time when it is older than this
_TMPFILE_FLAGS = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC


class IntegrityError(DstackError):
    """Stored or transferred data does not match its hash (corrupt, tampered or changed while saved)."""


class BlobInfo(NamedTuple):
    name: str  # a blob's hash or a manifest's digest
    mtime: float  # seconds since the epoch: written or last touched
    size: int


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed storage of blobs and manifests. Methods are safe to call from several threads;
    `concurrency` is how many threads pay off for many small transfers."""

    concurrency: int

    def has(self, h: str, *, touch: bool = False) -> bool:
        """Whether blob `h` is stored. `touch`: also mark it as just used, so that gc's grace period
        protects it while a manifest that reuses it is being saved."""

    def put_file(self, fd: int, h: str, size: int, check: Callable[[], None] | None = None) -> None:
        """Store the content of the open regular file `fd` (`size` bytes, BLAKE3 `h`, already
        computed by the caller) as blob `h`. `check` runs after the data is copied and before the blob
        is published (local) / right after the upload (S3, which then deletes it again when `check`
        raises): the caller's proof that the file did not change since it was hashed."""

    def ingest(self, fd: int, size: int, check: Callable[[], None] | None = None) -> str:
        """Store the content of the open regular file `fd` (`size` bytes) unless the store has it;
        return its hash. `check` as for put_file, also run once the file is hashed."""

    def put_bytes(self, data: bytes, h: str, *, trusted: bool = False) -> None:
        """Store `data` as blob `h`; IntegrityError if `h` is not its hash (unless the caller has just
        computed it from `data`: `trusted`)."""

    def fetch(self, h: str, dest: Path) -> None:
        """Write blob `h` to the file `dest` (read-only, 0444) atomically, verifying its hash.
        NotFound if it is not stored, IntegrityError if its content does not match."""

    def local_path(self, h: str) -> Path | None:
        """The blob's file on this machine (to hard-link), or None if the store is not a local folder."""

    def put_manifest(self, m: Manifest) -> str:
        """Store a manifest (write it after all its blobs); returns its digest."""

    def get_manifest(self, digest: str) -> Manifest:
        """A stored manifest, verified against its digest. NotFound if absent."""

    def has_manifest(self, digest: str) -> bool: ...

    def iter_blobs(self) -> Iterator[BlobInfo]: ...

    def delete_blobs(self, hashes: Iterable[str], *, older_than: float | None = None) -> list[str]:
        """Delete blobs; with `older_than` (epoch seconds) only those not written or touched since.
        Returns the hashes deleted."""

    def iter_manifests(self) -> Iterator[BlobInfo]: ...

    def delete_manifest(self, digest: str) -> None: ...

    def iter_stale_uploads(self, older_than: float) -> Iterator[BlobInfo]:
        """Leftovers of writes that never finished (killed uploads), started before `older_than`."""

    def delete_stale_upload(self, name: str) -> None: ...


# ---- hashing and copying, shared by the backends and the tree walker ----


def hash_bytes(data: bytes | memoryview) -> str:
    return blake3(data).hexdigest()


def _hasher(size: int, threads: int | None = None) -> blake3:
    if threads is None:
        threads = blake3.AUTO if size >= _THREADED_HASH and (os.cpu_count() or 1) > 2 else 1
    return blake3(max_threads=threads)


def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the ranges of `fd` that may hold data; holes of sparse files are skipped.
    Files that are not sparse (or filesystems that cannot tell) give one range."""
    st = os.fstat(fd)
    if size == 0:
        return
    if st.st_blocks * 512 >= size:
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            yield pos, size  # no SEEK_DATA here: take it all
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _pread_into(fd: int, buf: bytearray, n: int, offset: int) -> memoryview:
    mv = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k == 0:
            raise IntegrityError("file shrank while it was read")
        got += k
    return mv


def read_exactly(fd: int, size: int) -> bytes:
    """The next `size` bytes of `fd` (from offset 0 for a fresh fd); IntegrityError if the file is
    shorter now."""
    data = os.read(fd, size)
    if len(data) < size:
        parts = [data]
        got = len(data)
        while got < size:
            more = os.read(fd, size - got)
            if not more:
                raise IntegrityError("file shrank while it was read")
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def hash_fd(fd: int, size: int, threads: int | None = None) -> str:
    """BLAKE3 of the first `size` bytes of an open file. Reads with pread (no mmap: a file truncated
    meanwhile must not kill the process with SIGBUS); holes are hashed as zeros without reading.
    `threads`: BLAKE3's own threads (default: several for large files where there are cores)."""
    h = _hasher(size, threads)
    buf = bytearray(min(CHUNK, size) or 1)
    pos = 0
    for start, end in data_segments(fd, size):
        _hash_zeros(h, start - pos)
        while start < end:
            n = min(CHUNK, end - start)
            h.update(_pread_into(fd, buf, n, start))
            start += n
        pos = end
    _hash_zeros(h, size - pos)
    return h.hexdigest()


def _hash_zeros(h: blake3, n: int) -> None:
    while n > 0:
        k = min(n, CHUNK)
        h.update(_ZEROS[:k])
        n -= k


def hash_file(path: Path | str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def copy_fd(src: int, dst: int, size: int, stop: threading.Event | None = None) -> None:
    """Copy `size` bytes of `src` to the empty file `dst`: a reflink where the filesystem shares
    extents, else copy_file_range (in the kernel) over the data ranges only, so holes stay holes.
    `stop`: checked between steps; when set, the copy ends early (its result is to be dropped)."""
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        if os.fstat(dst).st_size == size:
            return
        os.ftruncate(dst, 0)  # the source grew: copy exactly `size` bytes
    except OSError:
        pass
    for start, end in data_segments(src, size):
        if not _copy_range(src, dst, start, end, stop):
            return
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int, stop: threading.Event | None = None) -> bool:
    pos = start
    step = (64 << 20) if stop else (1 << 30)
    while pos < end:
        if stop is not None and stop.is_set():
            return False
        try:
            n = os.copy_file_range(src, dst, min(end - pos, step), pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            _copy_range_by_reads(src, dst, pos, end)
            return True
        if n == 0:
            raise IntegrityError("file shrank while it was copied")
        pos += n
    return True


def _copy_range_by_reads(src: int, dst: int, start: int, end: int) -> None:
    buf = bytearray(min(CHUNK, end - start))
    while start < end:
        n = min(len(buf), end - start)
        mv = _pread_into(src, buf, n, start)
        _pwrite_all(dst, mv, start)
        start += n


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        k = os.pwrite(fd, mv, offset)
        mv = mv[k:]
        offset += k


def copy_and_hash(src: int, dst: int, size: int) -> str:
    """Copy `size` bytes from `src` to the empty file `dst` and return the BLAKE3 of what was written:
    one read of the data, holes kept as holes (hashed as zeros, not written)."""
    h = _hasher(size)
    buf = bytearray(min(CHUNK, size) or 1)
    pos = 0
    for start, end in data_segments(src, size):
        _hash_zeros(h, start - pos)
        while start < end:
            n = min(CHUNK, end - start)
            mv = _pread_into(src, buf, n, start)
            h.update(mv)
            _pwrite_all(dst, mv, start)
            start += n
        pos = end
    _hash_zeros(h, size - pos)
    os.ftruncate(dst, size)
    return h.hexdigest()


def check_hash(h: str) -> str:
    """`h` if it is a BLAKE3 hex digest (so it is safe in a path or a key)."""
    if len(h) != 64 or h.strip("0123456789abcdef"):
        raise IntegrityError(f"'{h}' is not a BLAKE3 hash")
    return h


# ---- the local folder ----


class LocalBlobStore:
    """A store in a local folder. Several processes may share it: every write appears whole or not at
    all (an unnamed O_TMPFILE linked into place, or tmp/ and a rename)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        self.hints = self.root / "hints"
        # Python threads only pay off for small files where there are many cores: with few, the GIL
        # passed between threads costs more than the syscalls they overlap (measured: 2 cores, 10k
        # files of 4 KiB: 1 thread 0.9 s, 2 threads 1.1 s, 8 threads 1.7 s)
        cpus = os.cpu_count() or 1
        self.concurrency = 1 if cpus <= 4 else min(4, cpus // 4)
        self._blobs = str(self.blobs)
        for d in (self.manifests, self.tmp, self.hints):
            d.mkdir(parents=True, exist_ok=True)
        self._tmpfile_ok = os.path.isdir("/proc/self/fd")
        if not (self.blobs / "ff").is_dir():  # fan-out made once, so no write pays a mkdir
            for i in range(256):
                (self.blobs / f"{i:02x}").mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _blob(self, h: str) -> str:
        return f"{self._blobs}/{h[:2]}/{h}"

    def _manifest(self, digest: str) -> Path:
        return self.manifests / f"{check_hash(digest)}.json"

    def _tmp_name(self) -> str:
        return f"{self.tmp}/{uuid.uuid4().hex}"

    def has(self, h: str, *, touch: bool = False) -> bool:
        path = self._blob(check_hash(h))
        try:
            st = os.stat(path)
            if touch and time.time() - st.st_mtime > TOUCH_AFTER:
                os.utime(path)  # only now and then: a touch is a metadata write
            return True
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's store: it is there, but we may not touch it
            return True

    def ingest(self, fd: int, size: int, check: Callable[[], None] | None = None) -> str:
        """Large files whose content the store has probably not seen (no hint) are copied while they
        are hashed, so that saving costs about one copy; the copy is dropped if the blob was there."""
        if size < SPECULATE or not self._tmpfile_ok:
            return ingest_fd(self, fd, size, check)
        hint = self.hints / _sample_key(fd, size)
        if hint.exists():
            h = ingest_fd(self, fd, size, check)
        else:
            h = self._ingest_copying(fd, size, check)
        if not hint.exists():
            _write_hint(hint, h)
        return h

    def _ingest_copying(self, fd: int, size: int, check: Callable[[], None] | None) -> str:
        try:
            out = os.open(self._blobs, _TMPFILE_FLAGS, 0o444)
        except OSError:
            return ingest_fd(self, fd, size, check)
        stop = threading.Event()
        failed: list[BaseException] = []

        def copy() -> None:
            try:
                copy_fd(fd, out, size, stop)
            except BaseException as e:  # handed to the caller below
                failed.append(e)

        copier = threading.Thread(target=copy, name="dstack-copy", daemon=True)
        copier.start()
        try:
            h = hash_fd(fd, size, threads=1)
            if check is not None:
                check()
            if self.has(h, touch=True):
                stop.set()
                return h  # the unnamed copy vanishes when it is closed
            copier.join()
            if failed:
                raise failed[0]
            self._seal(out, size, check)
            self._link(out, self._blob(h))
            return h
        finally:
            stop.set()
            copier.join()
            os.close(out)

    def put_file(self, fd: int, h: str, size: int, check: Callable[[], None] | None = None) -> None:
        check_hash(h)
        self._publish(lambda out: copy_fd(fd, out, size), self._blob(h), size, check)

    def put_bytes(self, data: bytes, h: str, *, trusted: bool = False) -> None:
        if not trusted and hash_bytes(data) != check_hash(h):
            raise IntegrityError(f"data given as blob {h} has another hash")
        folder = f"{self._blobs}/{h[:2]}"
        if self._tmpfile_ok:  # the common case, kept short: small files are many
            try:
                out = os.open(folder, _TMPFILE_FLAGS, 0o444)
            except OSError:
                pass
            else:
                try:
                    if os.write(out, data) != len(data):
                        _pwrite_all(out, data, 0)
                    self._link(out, f"{folder}/{h}")
                    return
                finally:
                    os.close(out)
        self._publish(lambda out: _pwrite_all(out, data, 0), f"{folder}/{h}", len(data), None)

    @staticmethod
    def _link(out: int, final: str) -> None:
        """Give the unnamed file `out` its name: linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N."""
        try:
            os.link(f"/proc/self/fd/{out}", final, src_dir_fd=_root_fd())
        except FileExistsError:
            pass  # the same content is there already

    @staticmethod
    def _seal(out: int, size: int, check: Callable[[], None] | None) -> None:
        got = os.fstat(out).st_size
        if got != size:
            raise IntegrityError(f"wrote {got} bytes of a {size}-byte blob")
        if check is not None:
            check()

    def _publish(self, write: Callable[[int], None], final: str, size: int,
                 check: Callable[[], None] | None) -> None:
        """Write a file that appears at `final` complete or not at all. Preferably as an unnamed file
        (O_TMPFILE) in the final folder, linked into place when done: a process killed halfway
        leaves nothing behind. Elsewhere: tmp/ and a rename."""
        if self._tmpfile_ok:
            try:
                out = os.open(os.path.dirname(final), _TMPFILE_FLAGS, 0o444)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile_ok = False
            else:
                try:
                    write(out)
                    self._seal(out, size, check)
                    self._link(out, final)
                    return
                finally:
                    os.close(out)
        tmp = self._tmp_name()
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            write(out)
            self._seal(out, size, check)
            os.rename(tmp, final)  # a blob of the same hash may be there already: same content
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            os.close(out)

    def fetch(self, h: str, dest: Path) -> None:
        check_hash(h)
        try:
            src = os.open(self._blob(h), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"blob {h} is not in the store {self.root}") from None
        try:
            size = os.fstat(src).st_size
            write_verified(Path(dest), h, lambda out: copy_and_hash(src, out, size))
        finally:
            os.close(src)

    def local_path(self, h: str) -> Path | None:
        return Path(self._blob(check_hash(h)))

    def put_manifest(self, m: Manifest) -> str:
        digest = m.digest()
        final = self._manifest(digest)
        try:
            os.utime(final)  # saved before: now it is fresh for gc's grace
            return digest
        except FileNotFoundError:
            pass
        data = m.canonical_json()
        self._publish(lambda out: _pwrite_all(out, data, 0), str(final), len(data), None)
        return digest

    def get_manifest(self, digest: str) -> Manifest:
        try:
            data = self._manifest(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"artifact manifest {digest} is not in the store {self.root}") from None
        return parse_manifest(data, digest)

    def has_manifest(self, digest: str) -> bool:
        return self._manifest(digest).exists()

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for sub in sorted(os.listdir(self.blobs)):
            yield from _listing(self.blobs / sub)

    def delete_blobs(self, hashes: Iterable[str], *, older_than: float | None = None) -> list[str]:
        deleted = []
        for h in hashes:
            path = self._blob(check_hash(h))
            if older_than is None:
                if _unlink_quietly(path):
                    deleted.append(h)
                continue
            # Race-free with `has(touch=True)`: move the blob aside first, then look at its time. A
            # touch before the move shows in the time (the blob goes back); a writer that looks
            # after the move finds nothing and stores the blob again.
            aside = self._tmp_name() + ".gc"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            if os.stat(aside).st_mtime >= older_than:
                os.rename(aside, path)
            else:
                os.unlink(aside)
                deleted.append(h)
        return deleted

    def iter_manifests(self) -> Iterator[BlobInfo]:
        for info in _listing(self.manifests):
            if info.name.endswith(".json"):
                yield info._replace(name=info.name[: -len(".json")])

    def delete_manifest(self, digest: str) -> None:
        _unlink_quietly(str(self._manifest(digest)))

    def iter_stale_uploads(self, older_than: float) -> Iterator[BlobInfo]:
        """Files in tmp/ (only where O_TMPFILE is missing), and hints whose blob is gone."""
        for info in _listing(self.tmp):
            if info.mtime < older_than:
                yield info
        for info in _listing(self.hints):
            if info.mtime < older_than:
                try:
                    h = (self.hints / info.name).read_text().strip()
                except OSError:
                    continue
                if not (len(h) == 64 and self.has(h)):
                    yield info._replace(name=f"hints/{info.name}")

    def delete_stale_upload(self, name: str) -> None:
        folder, _, base = name.rpartition("/")
        if folder not in ("", "hints") or base in ("", ".", ".."):
            raise IntegrityError(f"'{name}' is not an upload of this store")
        _unlink_quietly(f"{self.hints if folder else self.tmp}/{base}")


def ingest_fd(store: BlobStore, fd: int, size: int, check: Callable[[], None] | None = None) -> str:
    """Hash an open file, then store it unless the store has it already (touching it then)."""
    h = hash_fd(fd, size)
    if check is not None:
        check()
    if not store.has(h, touch=True):
        store.put_file(fd, h, size, check)
    return h


def _sample_key(fd: int, size: int) -> str:
    """A cheap fingerprint of a large file (size, and 64 KiB at its start, middle and end): the name
    of a hint that the store probably has its content. Only a hint: blobs are named by full hashes."""
    h = blake3(str(size).encode())
    for offset in (0, size // 2, max(0, size - 65536)):
        h.update(os.pread(fd, 65536, offset))
    return h.hexdigest()[:40]


def _write_hint(path: Path, h: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except OSError:
        return
    try:
        os.write(fd, h.encode())
    finally:
        os.close(fd)


def _listing(folder: Path) -> Iterator[BlobInfo]:
    with os.scandir(folder) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield BlobInfo(e.name, st.st_mtime, st.st_size)


def parse_manifest(data: bytes, digest: str) -> Manifest:
    """A manifest from its stored bytes, verified against the digest it was stored under."""
    if hash_bytes(data) != digest:
        raise IntegrityError(f"artifact manifest {digest} is corrupt (its content has another hash)")
    try:
        return Manifest.parse(data)
    except (ValueError, DstackError) as e:
        raise IntegrityError(f"artifact manifest {digest} is invalid: {e}") from None


def write_verified(dest: Path, h: str, write: Callable[[int], str]) -> None:
    """Create `dest` (0444) through a temporary file beside it; `write(fd)` fills it and returns the
    hash of what it wrote, which must be `h`."""
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.part"
    out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        got = write(out)
        if got != h:
            raise IntegrityError(f"blob {h} is corrupt: its content hashes to {got}")
        os.rename(tmp, dest)
    except BaseException:
        _unlink_quietly(str(tmp))
        raise
    finally:
        os.close(out)


_ROOT_FD: int | None = None


def _root_fd() -> int:
    """A directory fd, only so that os.link uses linkat(2), which can follow /proc/self/fd/N."""
    global _ROOT_FD
    if _ROOT_FD is None:
        _ROOT_FD = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _ROOT_FD


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return True


def file_identity(st: os.stat_result) -> tuple:
    """What changes when a file's content may have changed (ctime cannot be set back by anyone)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_store(config: dict) -> BlobStore:
    """The store a config names: {"type": "local", "path": ...} (default path DSTACK_HOME/storage), or
    {"type": "s3", "bucket": ..., "prefix": ..., "region": ..., "endpoint_url": ...}."""
    kind = config.get("type", "local")
    if kind == "local":
        from dstack.core.home import dstack_home

        return LocalBlobStore(Path(config.get("path") or dstack_home() / "storage"))
    if kind == "s3":
        from dstack.storage.s3 import S3BlobStore  # boto3 only where S3 is used

        if not config.get("bucket"):
            raise DstackError("the S3 artifact store needs a bucket")
        return S3BlobStore(
            bucket=config["bucket"],
            prefix=config.get("prefix") or "",
            region=config.get("region"),
            endpoint_url=config.get("endpoint_url"),
        )
    raise NotFound(f"unknown artifact store type '{kind}'", hint="use 'local' or 's3'")
