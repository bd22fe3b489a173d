"""`bench/artifacts.py --profile`: the parts of a save and of a first mount, each timed alone."""

from __future__ import annotations

import os
import time
from pathlib import Path

from _artifacts_data import GiB, MiB, fmt, make_big, make_small, med, rm, sh, size_label, sync, timed
from _common import stats, write_results

from dstack.storage.blobstore import LocalBlobStore
from dstack.storage.save import save_tree
from dstack.storage.tree import remove_tree, tree_cache


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _top(fn, n: int = 10) -> tuple[float, str]:
    """Wall time of fn() under cProfile, and its top functions by own time."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    dt = time.perf_counter() - t0
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(n)
    lines = [x for x in out.getvalue().splitlines() if x.strip()]
    start = next(i for i, x in enumerate(lines) if x.lstrip().startswith("ncalls"))
    return dt, "\n".join(lines[start:])


def profile(work: Path, quick: bool, rounds: int) -> dict:
    """The parts of a save and of a first mount, each timed alone (same rounds, interleaved)."""
    try:
        from dstack.storage.hashing import copy_and_hash, copy_fd, hash_fd
    except ImportError:  # before storage/hashing.py
        from dstack.storage.blobstore import copy_and_hash, copy_fd, hash_fd  # type: ignore[no-redef]
    import threading

    from dstack.core.manifest import Entry, Manifest

    size = 64 * MiB if quick else GiB
    count = 1000 if quick else 10_000
    big, small = work / "big" / "blob.bin", work / "small"
    make_big(big, size)
    make_small(small, count)
    sync()
    t: dict[str, list] = {k: [] for k in (
        "cp", "cp_cpu", "save", "save_cpu", "pread_only", "hash_1thread", "copy_fd",
        "hash_and_copy_fd_threads", "copy_and_hash_1pass", "small_entries_validated",
        "small_entries_construct", "small_manifest_build", "small_save", "small_save2", "get_manifest",
        "materialise", "link_floor_python", "cp_al")}
    buf = bytearray(4 * MiB)

    def tmpfile() -> int:
        return os.open(work, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o444)

    for i in range(rounds):
        print(f"  profile round {i + 1}/{rounds}", flush=True)
        sync()
        c0 = _cpu()
        t["cp"].append(sh(["cp", str(big), str(work / "cp.bin")]))
        t["cp_cpu"].append(_cpu() - c0)
        rm(work / "cp.bin")
        store = LocalBlobStore(work / f"store-{i}")
        sync()
        c0 = _cpu()
        t["save"].append(timed(save_tree, store, big.parent)[0])
        t["save_cpu"].append(_cpu() - c0)
        rm(work / f"store-{i}")
        fd = os.open(big, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            for off in range(0, size, len(buf)):
                os.preadv(fd, [buf], off)
            t["pread_only"].append(time.perf_counter() - t0)
            t["hash_1thread"].append(timed(hash_fd, fd, size, 1)[0])
            for key in ("copy_fd", "hash_and_copy_fd_threads", "copy_and_hash_1pass"):
                out = tmpfile()
                sync()
                t0 = time.perf_counter()
                if key == "copy_fd":
                    copy_fd(fd, out, size)
                elif key == "copy_and_hash_1pass":
                    copy_and_hash(fd, out, size)
                else:  # what LocalBlobStore._ingest_copying does: copy in a thread while hashing
                    th = threading.Thread(target=copy_fd, args=(fd, out, size, threading.Event()))
                    th.start()
                    hash_fd(fd, size, 1)
                    th.join()
                t[key].append(time.perf_counter() - t0)
                os.close(out)
        finally:
            os.close(fd)
        # many small files: the manifest's share
        h = "0" * 64
        rows = [(str(p.relative_to(small)), 0o644, 4096, h) for p in small.rglob("*.bin")]
        def make(rows=rows, new=Entry):
            return [new(path=r, kind="file", mode=m, size=z, hash=x) for r, m, z, x in rows]

        t["small_entries_validated"].append(timed(make)[0])
        dt, entries = timed(make, new=Entry.model_construct)
        t["small_entries_construct"].append(dt)
        dirs = [Entry(path=d.name, kind="dir", mode=0o755) for d in small.iterdir()]
        t["small_manifest_build"].append(timed(Manifest.build, dirs + entries)[0])
        store = LocalBlobStore(work / f"sstore-{i}")
        sync()
        dt, m = timed(save_tree, store, small)
        t["small_save"].append(dt)
        t["small_save2"].append(timed(save_tree, store, small)[0])
        digest = m.digest()
        dt, manifest = timed(store.get_manifest, digest)
        t["get_manifest"].append(dt)
        from dstack.storage.tree import materialise

        t["materialise"].append(timed(materialise, store, manifest, work / f"tree-{i}", work / "bcache")[0])
        remove_tree(work / f"tree-{i}")
        # the floor of the same links from Python: mkdir + os.link with str paths, no validation
        dest = str(work / f"links-{i}")
        blobs = str(store.blobs)
        t0 = time.perf_counter()
        os.mkdir(dest)
        for e in manifest.entries:
            if e.kind == "dir":
                os.mkdir(f"{dest}/{e.path}")
            else:
                os.link(f"{blobs}/{e.hash[:2]}/{e.hash}", f"{dest}/{e.path}")
        t["link_floor_python"].append(time.perf_counter() - t0)
        t["cp_al"].append(sh(["cp", "-al", str(small), str(work / f"al-{i}")]))
        rm(Path(dest))
        rm(work / f"al-{i}")
    # cProfile of one more of each (slower under the profiler; the shares are what count)
    store = LocalBlobStore(work / "sstore-prof")
    sync()
    profiles = {}
    profiles["save_small_first"] = _top(lambda: save_tree(store, small))
    profiles["save_small_second"] = _top(lambda: save_tree(store, small))
    digest = save_tree(store, small).digest()
    profiles["tree_cache_small_first"] = _top(lambda: tree_cache(store, digest, work / "trees-prof",
                                                                  work / "bc"))
    return {"size": size, "count": count, "times": t, "profiles": profiles}


def report_profile(res: dict, quick: bool) -> None:
    t = res["times"]
    print(f"\nwhere the time goes ({size_label(res['size'])}; {res['count']:,} x 4 KiB), medians:")
    for k, v in t.items():
        print(f"  {k:28s} {fmt(med(v))}")
    for k, (dt, text) in res["profiles"].items():
        print(f"\n== cProfile {k}: {fmt(dt)} under the profiler\n{text}")
    write_results("artifacts_profile_quick" if quick else "artifacts_profile", {
        "quick": quick, "size": res["size"], "count": res["count"],
        "steps": {k: stats(v) for k, v in t.items() if v},
        "cprofile": {k: {"wall_s": dt, "top": text} for k, (dt, text) in res["profiles"].items()}})

