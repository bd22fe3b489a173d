"""Code blobs of runs (diffs, tars), by sha256, in DSTACK_HOME/server/code. Runners fetch them over HTTP."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from dstack.core.errors import ConfigError, NotFound


class CodeBlobs:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise ConfigError(f"'{digest}' is not a sha256 hash")
        return self.root / digest

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def put(self, digest: str, data: bytes) -> None:
        final = self._path(digest)
        if final.exists():
            return
        if hashlib.sha256(data).hexdigest() != digest:
            raise ConfigError("the code blob does not match its hash", hint="upload it again")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, final)

    def collect(self, live: set[str], grace: float, dry_run: bool) -> tuple[int, int]:
        """Delete the blobs not in `live` (older than `grace` seconds); (count, bytes)."""
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

    def get(self, digest: str) -> bytes:
        try:
            return self._path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no code blob {digest}") from None
