"""Code blobs of runs (diffs, tars), by sha256, in DSTACK_HOME/server/code. Runners fetch them over HTTP.

An upload streams to a temporary file in that folder, hashed on the way, and is renamed into place only
when its sha256 is the digest it was sent under: the server holds a few MB of it at a time, whatever its
size, and a blob never exists half-written or under a wrong name."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterable
from pathlib import Path

from dstack.core.errors import ConfigError, NotFound

TMP_PREFIX = ".tmp-"
WRITE_SIZE = 4 << 20  # bytes gathered before one write + hash in a thread: few thread hops, little memory


class CodeBlobs:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def remove_partial(self) -> None:
        """Uploads that a server process killed mid-way left (`.tmp-*`); only at start, when none is in flight."""
        for tmp in self.root.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise ConfigError(f"'{digest}' is not a sha256 hash")
        return self.root / digest

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    async def put(self, digest: str, chunks: AsyncIterable[bytes]) -> None:
        """Store the blob whose bytes `chunks` gives under `digest`, refused (nothing stored) unless that is
        their sha256. A blob already stored is not written again (its bytes are read and dropped)."""
        final = self._path(digest)
        if final.exists():
            async for _ in chunks:
                pass
            return
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                buf = bytearray()
                async for chunk in chunks:
                    buf += chunk
                    if len(buf) >= WRITE_SIZE:
                        await asyncio.to_thread(_write, f, h, buf)
                        buf = bytearray()
                if buf:
                    await asyncio.to_thread(_write, f, h, buf)
            if h.hexdigest() != digest:
                raise ConfigError("the code blob does not match its hash", hint="upload it again")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)  # refused, or the upload broke off

    def file(self, digest: str) -> Path:
        """The stored blob's file, for streaming it out."""
        path = self._path(digest)
        if not path.is_file():
            raise NotFound(f"no code blob {digest}")
        return path

    def collect(self, live: set[str], grace: float, dry_run: bool) -> tuple[int, int]:
        """Delete the blobs not in `live` (older than `grace` seconds), and uploads left unfinished that long
        ago; (count, bytes)."""
        import time

        cutoff = time.time() - grace
        count = size = 0
        for p in self.root.iterdir():
            if p.name in live:
                continue
            st = p.stat()
            if st.st_mtime >= cutoff:
                continue
            count, size = count + 1, size + st.st_size
            if not dry_run:
                p.unlink(missing_ok=True)
        return count, size


def _write(f, h, data: bytearray) -> None:
    h.update(data)
    f.write(data)
