"""A runner's cache of blobs fetched from a remote store: bounded, the least recently used out first.

Layout: <root>/<h[:2]>/<h> (0444), plus `<h>.x` (0555) for content that a tree links as an executable.
Written atomically and verified on fetch, so whatever is in it is right; safe to share between processes.
Dependency trees built from it are hard links to its blobs, so a tree holds its blobs' disk space as well:
`prune` removes blobs that no tree links, then the trees that no job mounts (least recently mounted first)
with the blobs only they held, until what the cache holds fits its bound."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

from dstack.storage.hashing import copy_fd

DEFAULT_CACHE_SIZE = 20 * 1000**3  # bytes (20 GB): `dstack-runner start --cache-size`
TOUCH_AFTER = 60.0  # seconds: a blob used again is marked as used when its mark is older than this
_BLOB_NAME = re.compile(r"[0-9a-f]{64}(\.x)?")


class _Fetches(Protocol):
    def fetch(self, h: str, dest: Path) -> None: ...


class Pruned(NamedTuple):
    blobs: int
    trees: int
    bytes: int


class BlobCache:
    """Blobs on the runner's disk. `limit`: the bytes `prune` keeps it within (None: unbounded)."""

    def __init__(self, root: Path, limit: int | None = None):
        self.root = Path(root)
        self.limit = limit
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Hold the cache while trees are built from it: `prune` waits for no one, and prunes nothing meanwhile
        (a blob just fetched is linked by no tree yet). Shared by any number of builders, threads or processes."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def path(self, h: str, executable: bool = False) -> Path:
        return self.root / h[:2] / (f"{h}.x" if executable else h)

    def ensure(self, store: _Fetches, h: str) -> Path:
        """The cached blob; fetched once if absent, marked as used if present."""
        p = self.path(h)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            p.parent.mkdir(exist_ok=True)
            store.fetch(h, p)
            return p
        _touch(p, st)
        return p

    def executable(self, source: Path, h: str) -> Path:
        """A 0555 copy of blob `h` (from `source`), to hard-link where the manifest says +x."""
        p = self.path(h, executable=True)
        try:
            _touch(p, os.stat(p))
        except FileNotFoundError:
            p.parent.mkdir(exist_ok=True)
            copy_file(source, p, 0o555, atomic=True)
        return p

    def _blobs(self) -> list[tuple[Path, os.stat_result]]:
        found = []
        for sub in self.root.iterdir() if self.root.is_dir() else ():
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            with os.scandir(sub) as it:
                for e in it:
                    if _BLOB_NAME.fullmatch(e.name):
                        try:
                            found.append((Path(e.path), e.stat(follow_symlinks=False)))
                        except FileNotFoundError:
                            continue
        return found

    def usage(self) -> int:
        """Bytes of the cached blobs (trees that link them add nothing: the same inodes)."""
        return sum(st.st_size for _p, st in self._blobs())

    def prune(self, trees: Path | None = None, in_use: set[str] = frozenset()) -> Pruned:
        """Bring the cache within its limit: first blobs that no tree links (least recently used first), then
        trees under `trees` not in `in_use` (manifest digests that jobs mount now), least recently mounted
        first, each with the blobs that only it held. Nothing while trees are being built from it (`using`)."""
        if self.limit is None:
            return Pruned(0, 0, 0)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # trees are being built from it: the next prune does it
            os.close(fd)
            return Pruned(0, 0, 0)
        try:
            return self._prune(trees, in_use)
        finally:
            os.close(fd)

    def _prune(self, trees: Path | None, in_use: set[str]) -> Pruned:
        blobs = self._blobs()
        total = sum(st.st_size for _p, st in blobs)
        freed = removed_blobs = removed_trees = 0
        if total <= self.limit:
            return Pruned(0, 0, 0)
        for p, st in sorted((b for b in blobs if b[1].st_nlink == 1), key=lambda b: b[1].st_mtime):
            if total - freed <= self.limit:
                break
            if _unlink(p):
                freed, removed_blobs = freed + st.st_size, removed_blobs + 1
        if total - freed > self.limit and trees is not None and trees.is_dir():
            by_inode = {st.st_ino: p for p, st in blobs if st.st_nlink > 1}
            candidates = []
            for t in trees.iterdir():
                if t.name in in_use or t.name.startswith("."):
                    continue
                try:
                    candidates.append((t.stat().st_mtime, t))
                except FileNotFoundError:
                    continue
            from dstack.storage.tree import remove_tree  # tree imports this module

            for _mtime, t in sorted(candidates):
                if total - freed <= self.limit:
                    break
                inodes = _file_inodes(t)
                remove_tree(t)
                removed_trees += 1
                for ino in inodes:
                    p = by_inode.get(ino)
                    if p is None:
                        continue
                    try:
                        st = os.stat(p)
                    except FileNotFoundError:
                        continue
                    if st.st_nlink == 1 and _unlink(p):
                        freed, removed_blobs = freed + st.st_size, removed_blobs + 1
                        del by_inode[ino]
        return Pruned(removed_blobs, removed_trees, freed)


def _touch(p: Path, st: os.stat_result) -> None:
    if time.time() - st.st_mtime > TOUCH_AFTER:
        try:
            os.utime(p)
        except OSError:  # another user's cache, or pruned just now: it only orders the pruning
            pass


def _unlink(p: Path) -> bool:
    try:
        os.unlink(p)
        return True
    except FileNotFoundError:
        return False


def _file_inodes(tree: Path) -> set[int]:
    inodes = set()
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if st.st_nlink > 1:
                inodes.add(st.st_ino)
    return inodes


def copy_file(src: Path, dst: Path, mode: int, atomic: bool = False) -> None:
    """Copy the file `src` to the new file `dst` with `mode`; `atomic`: through a temporary name beside it."""
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


def parse_size(text: str) -> int:
    """`20GB`, `512MB`, `1.5 GiB`, `1000000` as bytes (GB = 1000**3, GiB = 1024**3)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise ValueError(f"'{text}' is not a size; write it as 20GB, 512MB or a number of bytes")
    number, unit, binary = m.groups()
    scale = (1024 if binary else 1000) ** " kmgt".index(unit or " ")
    return int(float(number) * scale)
