"""Helpers of bench/artifacts.py: data sets, timing, files, and the report's number formats."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
FICLONE = 0x40049409

# ---- helpers ----


def sync() -> float:
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def sh(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, **kw)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} exited {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    return dt


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def rm(path: Path) -> None:
    """Delete a tree, read-only folders (trees, DVC's cache) included."""
    if not os.path.lexists(path):
        return
    subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True)
    subprocess.run(["rm", "-rf", str(path)], check=True)


def fincore(paths: list[Path]) -> str:
    """Page-cache residency (util-linux fincore), summed: '<resident> of <size>'."""
    if not shutil.which("fincore") or not paths:
        return "unknown (no fincore)"
    cmd = ["fincore", "-b", "-n", "-o", "RES,SIZE", *map(str, paths)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    res = size = 0
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            res += int(parts[0])
            size += int(parts[1])
    return f"{res / MiB:.0f} MiB of {size / MiB:.0f} MiB resident"


def reflink_support(folder: Path) -> str:
    a, b = folder / ".reflink-a", folder / ".reflink-b"
    a.write_bytes(b"x" * 4096)
    fa = os.open(a, os.O_RDONLY)
    fb = os.open(b, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.ioctl(fb, FICLONE, fa)
        return "yes"
    except OSError as e:
        return f"no ({errno.errorcode.get(e.errno, e.errno)})"
    finally:
        os.close(fa)
        os.close(fb)
        a.unlink()
        b.unlink()


def make_big(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def make_small(root: Path, count: int, size: int = 4096) -> None:
    per = 100
    for d in range((count + per - 1) // per):
        folder = root / f"d{d:03d}"
        folder.mkdir(parents=True)
        for i in range(min(per, count - d * per)):
            (folder / f"f{i:03d}.bin").write_bytes(os.urandom(size))


def make_sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(MiB))
        f.seek(size - MiB)
        f.write(os.urandom(MiB))


def create_probe(folder: Path, n: int = 500) -> float:
    """Microseconds per file create (open O_CREAT + close) on this disk now: shows the ext4 slowdown
    after deletes (see the module's note). The files stay until the end of the run."""
    folder.mkdir()
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(folder / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - t0) / n * 1e6


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def bind_script(tree: Path, job_root: Path) -> str | None:
    """The host executor's own bind-mount lines for one read-only mount (None: not root / no unshare)."""
    try:
        from dstack.runner.executors.base import Mount
        from dstack.runner.executors.host import _bind_mounts_script, _can_bind_mount
    except ImportError:
        return None
    if not _can_bind_mount():
        return None
    return _bind_mounts_script(job_root, [Mount(source=tree, target="dep", read_only=True)])


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(a: list[float], b: list[float]) -> float | None:
    """Median of the per-round ratios a/b (rounds where both ran)."""
    rs = [x / y for x, y in zip(a, b, strict=False) if y > 0]
    return statistics.median(rs) if rs else None


def rx(r: float | None, what: str) -> str:
    return "-" if r is None else f"{r:.2f}x {what}"


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 0.001:
        return f"{x * 1000:.2f} ms"
    return f"{x * 1000:.1f} ms" if x < 0.1 else f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def size_label(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"

