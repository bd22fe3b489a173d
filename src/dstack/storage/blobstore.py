"""Where blobs and manifests live: the interface, the local folder backend, and the hashing and
copying they share.

A blob is the content of one file, named by its BLAKE3 hash and never changed. A manifest
(dstack.storage.manifest) names the blobs of one artifact; putting it is what makes the artifact
exist, so it is always written last. Everything is written to a temporary name first and renamed
(or, on S3, completed) into place: a reader sees a whole object or none.

Local layout (default: DSTACK_HOME/storage):
    blobs/<h[:2]>/<h>        read-only (0444) files
    manifests/<digest>.json  canonical JSON, read-only
    tmp/                     unfinished writes; never read; removed by gc once stale"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from blake3 import blake3

from dstack.core.errors import DstackError, NotFound
from dstack.storage.manifest import Manifest

CHUNK = 4 << 20  # bytes per read/hash/copy step
SMALL_FILE = 4 << 20  # files up to this size are read into memory once (hash and write from there)
_THREADED_HASH = 64 << 20  # above this, BLAKE3 hashes with several threads where there are cores
_FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, XFS, bcachefs); ext4 says no
_ZEROS = memoryview(bytes(CHUNK))


class IntegrityError(DstackError):
    """Stored or transferred data does not match its hash (corrupt, tampered or changed while saved)."""


class BlobInfo(NamedTuple):
    name: str  # a blob's hash or a manifest's digest
    mtime: float  # seconds since the epoch: written or last touched
    size: int


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed storage of blobs and manifests. Methods are safe to call from several threads."""

    def has(self, h: str, *, touch: bool = False) -> bool:
        """Whether blob `h` is stored. `touch`: also mark it as just used, so that gc's grace period
        protects it while a manifest that reuses it is being saved."""

    def put_file(self, fd: int, h: str, size: int, check: Callable[[], None] | None = None) -> None:
        """Store the content of the open regular file `fd` (`size` bytes, BLAKE3 `h`, already
        computed by the caller) as blob `h`. `check` runs after the data is copied and before the blob
        is published (local) / right after the upload (S3, which then deletes it again when `check`
        raises): the caller's proof that the file did not change since it was hashed."""

    def put_bytes(self, data: bytes, h: str) -> None:
        """Store `data` as blob `h`; raises IntegrityError if `h` is not its hash."""

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


def _hasher(size: int) -> blake3:
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
    """The first `size` bytes of `fd`; IntegrityError if the file is shorter now."""
    buf = bytearray(size)
    _pread_into(fd, buf, size, 0)
    return bytes(buf)


def hash_fd(fd: int, size: int) -> str:
    """BLAKE3 of the first `size` bytes of an open file. Reads with pread (no mmap: a file truncated
    meanwhile must not kill the process with SIGBUS); holes are hashed as zeros without reading."""
    h = _hasher(size)
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


def copy_fd(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes of `src` to the empty file `dst`: a reflink where the filesystem shares
    extents, else copy_file_range (in the kernel) over the data ranges only, so holes stay holes."""
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        if os.fstat(dst).st_size == size:
            return
        os.ftruncate(dst, 0)  # the source grew: copy exactly `size` bytes
    except OSError:
        pass
    for start, end in data_segments(src, size):
        _copy_range(src, dst, start, end)
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, min(end - pos, 1 << 30), pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            _copy_range_by_reads(src, dst, pos, end)
            return
        if n == 0:
            raise IntegrityError("file shrank while it was copied")
        pos += n


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
    if len(h) != 64 or h.strip("0123456789abcdef"):
        raise IntegrityError(f"'{h}' is not a BLAKE3 hash")
    return h


# ---- the local folder ----


class LocalBlobStore:
    """A store in a local folder. Several processes may share it (all writes are rename-into-place)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        for d in (self.manifests, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        if not (self.blobs / "ff").is_dir():  # fan-out made once, so no write pays a mkdir
            for i in range(256):
                (self.blobs / f"{i:02x}").mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _blob(self, h: str) -> str:
        return f"{self.blobs}/{h[:2]}/{h}"

    def _manifest(self, digest: str) -> Path:
        return self.manifests / f"{check_hash(digest)}.json"

    def _tmp_name(self) -> str:
        return f"{self.tmp}/{uuid.uuid4().hex}"

    def has(self, h: str, *, touch: bool = False) -> bool:
        check_hash(h)
        try:
            if touch:
                os.utime(self._blob(h))
            else:
                os.stat(self._blob(h))
            return True
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's store: it is there, but we may not touch it
            return True

    def put_file(self, fd: int, h: str, size: int, check: Callable[[], None] | None = None) -> None:
        check_hash(h)
        self._publish(lambda out: copy_fd(fd, out, size), self._blob(h), size, check)

    def put_bytes(self, data: bytes, h: str) -> None:
        if hash_bytes(data) != check_hash(h):
            raise IntegrityError(f"data given as blob {h} has another hash")
        self._publish(lambda out: _pwrite_all(out, data, 0), self._blob(h), len(data), None)

    def _publish(self, write: Callable[[int], None], final: str, size: int,
                 check: Callable[[], None] | None) -> None:
        tmp = self._tmp_name()
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            write(out)
            if os.fstat(out).st_size != size:
                raise IntegrityError(f"wrote {os.fstat(out).st_size} bytes of a {size}-byte blob")
            if check is not None:
                check()
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
            with os.scandir(self.blobs / sub) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield BlobInfo(e.name, st.st_mtime, st.st_size)

    def delete_blobs(self, hashes: Iterable[str], *, older_than: float | None = None) -> list[str]:
        deleted = []
        for h in hashes:
            path = self._blob(check_hash(h))
            if older_than is None:
                if _unlink_quietly(path):
                    deleted.append(h)
                continue
            # Race-free with `has(touch=True)`: move the blob aside first, then look at its time. A
            # touch before the move shows in the time (the blob goes back); one after it finds
            # nothing, and that writer uploads the blob again.
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
        with os.scandir(self.manifests) as it:
            for e in it:
                if not e.name.endswith(".json"):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield BlobInfo(e.name[: -len(".json")], st.st_mtime, st.st_size)

    def delete_manifest(self, digest: str) -> None:
        _unlink_quietly(str(self._manifest(digest)))

    def iter_stale_uploads(self, older_than: float) -> Iterator[BlobInfo]:
        with os.scandir(self.tmp) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_mtime < older_than:
                    yield BlobInfo(e.name, st.st_mtime, st.st_size)

    def delete_stale_upload(self, name: str) -> None:
        if "/" in name or name in (".", ".."):
            raise IntegrityError(f"'{name}' is not an upload of this store")
        _unlink_quietly(f"{self.tmp}/{name}")


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
