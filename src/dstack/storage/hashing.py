"""Hashing and copying file data: BLAKE3 in chunks (threads for big files), holes of sparse files
skipped, in-kernel copies (reflink, copy_file_range) where the filesystem allows."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from blake3 import blake3

from dstack.core.errors import DstackError

CHUNK = 4 << 20  # bytes per read/hash/copy step
SMALL_FILE = 4 << 20  # files up to this size are read into memory once (hash and write from there)
_THREADED_HASH = 64 << 20  # above this, BLAKE3 hashes with several threads where there are cores
_FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, XFS, bcachefs); ext4 says no
_ZEROS = memoryview(bytes(CHUNK))


class IntegrityError(DstackError):
    """Stored data does not match its hash, or a file changed while it was being saved."""

    kind = "integrity"  # how the server's answer says it (a runner sends such bytes again)


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
        pwrite_all(dst, mv, start)
        start += n


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
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
            pwrite_all(dst, mv, start)
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

