"""A full disk, said as such: which disk, how full, and what could not be kept (instead of a 500)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dstack.core.errors import Unavailable
from dstack.core.sizes import human_size

FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError of a full disk or quota, or SQLite's "database or disk is full" (as SQLAlchemy wraps it)."""
    if isinstance(exc, OSError) and exc.errno in FULL:
        return True
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).lower()
    return "database or disk is full" in text or "no space left on device" in text or "disk quota" in text


def mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    dev = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def describe_disk(path: Path) -> str:
    """'the disk of /x/y (tmpfs mounted at /x: 0 B free of 16.0 MB)'."""
    try:
        mount = mount_point(path)
        st = os.statvfs(mount)
        kind = _fs_type(mount)
        return (f"the disk of {path} ({kind + ' ' if kind else ''}mounted at {mount}: "
                f"{human_size(st.f_bavail * st.f_frsize)} free of {human_size(st.f_blocks * st.f_frsize)})")
    except OSError:
        return f"the disk of {path}"


def disk_full(exc: BaseException, path: Path, what: str) -> Unavailable:
    """The error a client sees when `what` could not be kept because the disk of `path` is full."""
    return Unavailable(f"{what}: no space left on {describe_disk(Path(getattr(exc, 'filename', None) or path))}",
                       hint="free space on that disk; runners retry their reports until they are taken")


def _fs_type(mount: Path) -> str | None:
    """The file system type of the mount at `mount` (the last such line of /proc/mounts: the one on top)."""
    kind = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1].replace("\\040", " ") == str(mount):
                    kind = parts[2]
    except OSError:
        return None
    return kind
