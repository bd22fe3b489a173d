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
from dstack.storage.hashing import (
    IntegrityError,
    check_hash,
    copy_and_hash,
    copy_fd,
    hash_bytes,
    hash_fd,
    pwrite_all,
)

SPECULATE = 16 << 20  # local store: files from this size on may be copied while they are hashed
TOUCH_AFTER = 600.0  # seconds: `has(touch=True)` renews a blob's time when it is older than this
_TMPFILE_FLAGS = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC


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


@runtime_checkable
class Presigns(Protocol):
    """A store that can hand out presigned URLs (S3): a runner moves blobs with them, never holding the store's
    credentials. The server gives a runner only URLs of its own jobs' blobs."""

    def presign_get(self, h: str) -> str: ...

    def presign_put(self, h: str, size: int) -> str: ...

    def start_parts(self, h: str) -> str: ...

    def uploaded_parts(self, h: str, upload_id: str) -> dict[int, tuple[str, int]]: ...

    def presign_part(self, h: str, upload_id: str, number: int) -> str: ...

    def finish_parts(self, h: str, upload_id: str, size: int) -> None: ...


# ---- hashing and copying, shared by the backends and the tree walker ----


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
        try:
            return self.stat_blob(h, touch=touch) is not None
        except PermissionError:  # another user's store: it is there, but we may not touch it
            return True

    def stat_blob(self, h: str, *, touch: bool = False) -> os.stat_result | None:
        """The blob's file status (None: not stored); `touch` as for has()."""
        path = self._blob(check_hash(h))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if touch and time.time() - st.st_mtime > TOUCH_AFTER:
            try:
                os.utime(path)  # only now and then: a touch is a metadata write
            except FileNotFoundError:  # gc took it just now
                return None
            except PermissionError:  # another user's store: it is there, but we may not touch it
                pass
        return st

    def adopt(self, fd: int, h: str) -> bool:
        """Make the open regular file `fd` blob `h` itself: hard-linked into place, no copy. Only for a
        read-only (0444) file that nobody else can reach or write any more (the caller has made
        sure), whose content hashes to `h`. FileExistsError when the store has `h` already;
        False when the kernel refuses the link (another disk, protected_hardlinks). Nothing is
        stored then."""
        try:
            os.link(f"/proc/self/fd/{fd}", self._blob(check_hash(h)), src_dir_fd=_root_fd())
            return True
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOENT):
                return False
            raise

    def unlink_if(self, h: str, st: os.stat_result) -> None:
        """Remove blob `h` if it is still the file `st` describes (an adoption taken back)."""
        path = self._blob(check_hash(h))
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            _unlink_quietly(path)

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
                        pwrite_all(out, data, 0)
                    self._link(out, f"{folder}/{h}")
                    return
                finally:
                    os.close(out)
        self._publish(lambda out: pwrite_all(out, data, 0), f"{folder}/{h}", len(data), None)

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
        self._publish(lambda out: pwrite_all(out, data, 0), str(final), len(data), None)
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
