"""Artifacts (issue 3): saving a finished job's folder into the local blob store and mounting a saved one, against
`cp` on the same disk, and the same steps with DVC.

Data sets (full run; `--quick` uses 64 MiB, 1,000 files and 256 MiB):
  big     one file of 1 GiB of random bytes
  small   10,000 files of 4 KiB of random bytes in 100 folders
  sparse  one 4 GiB sparse file (1 MiB of data at each end, holes between): mount only

Per round, for `big` and `small` (one untimed warm-up round first for `big`):
  cp          `cp FILE` / `cp -r DIR` to the same disk (the floor of saving). The copy is also the
              finished job's folder that `save` saves, as the runner would find it.
  save        what the runner does when a job ends, in-process: `save_tree(store, job, adopt=True,
              trees=..., cache=...)` into a fresh LocalBlobStore on the same disk. The job's files
              become the blobs (hard links) and its folder moves to trees/<digest>.
  save2       the same files saved again (the planted tree: blob inodes with their hash remembered)
  same-bytes  (information) the same bytes in new files (`cp -r`, untimed, then a timed save): a job
              that wrote identical output again; everything is read and hashed, nothing stored
  copying     (information) `save_tree` of the source into a fresh store, no adoption: what a save
              costs where the store is on another disk (or S3, minus the network)
  mount       `tree_cache(store, digest, trees, cache)` right after the save: the planted tree
  mount-cold  the same into an empty trees folder: built from the manifest (what a runner does where
              nothing was planted: nested artifacts, another machine)
  mount2      the same call again (reuse)
  cp-al       `cp -al DIR` (a tree of hard links: the floor of building a tree of links)
  bind        what the host executor runs for the mount as root: `unshare -m sh -c <its bind-mount
              script>`, next to `unshare -m sh -c true` (information only)
  dvc-*       (the first --dvc-rounds rounds) the same steps with DVC, through its Python API in a
              worker process of its own venv, so that neither side pays a CLI start: `Repo.add`
              twice (fresh cache, then unchanged), then with the data moved aside `Repo.checkout`
              with the default cache.type (reflink,copy: copy on ext4), again (reuse), and with
              cache.type hardlink (first, reuse). `dvc version` (CLI start) is timed for information.
Before every timed step that writes, `sync` runs (untimed) so that no step pays for the previous
one's writeback; `sync` right after a save or a copy is timed too and reported as information.

The ext4 root of these machines has no journal; ext4 then skips inodes freed in the last ~30 s when
it allocates one (fs/ext4/ialloc.c: find_inode_bit -> recently_deleted), and each create after a
mass delete scans past them (measured here: 12 us per create on tmpfs, 450-900 us on this disk after
deletes). So nothing with many files is deleted until the end of the run, and hard-link trees
(tree_cache, cp -al), which free no inode when removed, are the only many-file trees removed
between rounds. Other sessions' deletes on the same disk still add noise: see the cp -r spread.

Targets: save < 1.5x cp (big), < 2x cp -r (small); save2 < 0.3x save; mount < 0.1 s for every size
(first mount and reuse).

Usage: .venv/bin/python bench/artifacts.py [--quick] [--rounds N] [--dvc-rounds N] [--no-dvc]
       [--dvc-venv /tmp/dstack-bench-dvc-venv]   (created with `pip install dvc` if missing)
       .venv/bin/python bench/artifacts.py --profile [--quick]   (the parts of a save and of a mount,
       each timed alone, plus cProfile tops; bench/results/artifacts_profile.json)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _artifacts_data import (  # noqa: E402
    GiB,
    MiB,
    bind_script,
    count_files,
    create_probe,
    fincore,
    fmt,
    make_big,
    make_small,
    make_sparse,
    med,
    ratio,
    reflink_support,
    rm,
    rx,
    sh,
    size_label,
    sync,
    timed,
)
from _common import REPO, print_table, stats, write_results  # noqa: E402
from _dvc import DVC_VENV, Dvc, dvc_round, ensure_dvc  # noqa: E402

from dstack.storage.blobstore import LocalBlobStore  # noqa: E402
from dstack.storage.save import save_tree  # noqa: E402
from dstack.storage.tree import remove_tree, tree_cache  # noqa: E402

# ---- the rounds ----


def run_set(name: str, src: Path, work: Path, rounds: int, dvc_rounds: int, dvc: Dvc | None,
            keep_files: bool, warmup: bool) -> dict[str, list]:
    """All steps for one data set; returns step -> per-round values. `keep_files`: nothing with many
    files is deleted before the end of the run (see the module's note on ext4)."""
    big = src.is_file()
    src_dir = src.parent if big else src  # what save_tree and cp -al take
    t: dict[str, list] = {k: [] for k in (
        "cp", "cp_sync", "store_create", "save", "save_sync", "save2", "save_same_bytes", "save_copying",
        "mount", "mount_cold", "mount2", "cp_al", "bind",
        "bind_floor", "dvc_add", "dvc_add_sync", "dvc_add2", "dvc_checkout", "dvc_checkout2",
        "dvc_checkout_hl", "dvc_checkout_hl2")}
    info: dict = {}
    root = work / name
    root.mkdir()
    job_root = root / "job"
    job_root.mkdir()
    if warmup:  # the first write of fresh memory costs ~2.7 s/GiB on these VMs: pay it untimed
        sync()
        sh(["cp", str(src), str(root / "warm.bin")])
        store = LocalBlobStore(root / "warm-store")
        save_tree(store, src_dir)  # copies: the source stays
        rm(root / "warm.bin")
        rm(root / "warm-store")
    for i in range(rounds):
        print(f"  {name} round {i + 1}/{rounds}", flush=True)
        # A: cp to the same disk; the copy is also the finished job's folder that B saves
        job = root / f"job-{i}"
        if big:
            job.mkdir()
        sync()
        t["cp"].append(sh(["cp", str(src), str(job / src.name)] if big else ["cp", "-r", str(src), str(job)]))
        t["cp_sync"].append(sync())
        # B: what the runner does when a job ends: save its folder into the store on this disk (files
        # adopted as blobs, the folder planted as the dependency tree), then the same files again
        dt, store = timed(LocalBlobStore, root / f"store-{i}")
        t["store_create"].append(dt)
        trees, cache = root / f"trees-{i}", root / f"blobcache-{i}"
        sync()
        dt, m = timed(save_tree, store, job, adopt=True, trees=trees, cache=cache)
        t["save"].append(dt)
        t["save_sync"].append(sync())
        digest = m.digest()
        assert not job.exists() and (trees / digest).is_dir(), "the job's folder was not planted"
        dt, m2 = timed(save_tree, store, trees / digest, adopt=True)
        t["save2"].append(dt)
        assert [e.hash for e in m2.entries] == [e.hash for e in m.entries], "the second save differs"
        info.update(files=m.files, bytes=m.size, digest=digest)
        # information: the same bytes in new files (a job that wrote the same output again: read and
        # hashed, nothing stored), and a save that must copy (the store on another disk, or S3)
        again = root / f"again-{i}"
        sh(["cp", "-r", str(src_dir), str(again)])
        sync()
        t["save_same_bytes"].append(timed(save_tree, store, again, adopt=True, trees=trees, cache=cache)[0])
        copy_store = LocalBlobStore(root / f"copy-store-{i}")
        sync()
        t["save_copying"].append(timed(save_tree, copy_store, src_dir)[0])
        if big or not keep_files:
            rm(again)
            rm(root / f"copy-store-{i}")
        # C: mount: the planted tree (what a dependent job on this runner gets), a tree built from
        # the manifest where none was planted (nested artifacts, a runner elsewhere), reuse; a tree of
        # hard links (cp -al) as the floor; the bind mount
        dt, tree = timed(tree_cache, store, digest, trees, cache)
        t["mount"].append(dt)
        assert tree == trees / digest and count_files(tree) == m.files
        cold = root / f"trees-cold-{i}"
        dt, built = timed(tree_cache, store, digest, cold, cache)
        t["mount_cold"].append(dt)
        t["mount2"].append(timed(tree_cache, store, digest, cold, cache)[0])
        assert count_files(built) == m.files
        info["tree_nlink"] = os.stat(next(p for p in tree.rglob("*") if p.is_file())).st_nlink
        script = bind_script(tree, job_root)
        if script is not None:
            unshare = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
            t["bind"].append(sh([*unshare, script]))
            t["bind_floor"].append(sh([*unshare, "true"]))
        t["cp_al"].append(sh(["cp", "-al", str(src_dir), str(root / f"al-{i}")]))
        remove_tree(cold)  # hard links only: frees no inode
        rm(root / f"al-{i}")
        if big or not keep_files:
            remove_tree(trees)
            rm(root / f"store-{i}")
            rm(cache)
        # D: DVC
        if dvc is not None and i < dvc_rounds:
            dvc_round(dvc, src, root / f"dvc-{i}", t, info, big, keep_files)
    return {"times": t, "info": info}

def run_sparse(src: Path, work: Path, rounds: int) -> dict:
    root = work / "sparse"
    root.mkdir()
    store = LocalBlobStore(root / "store")
    sync()
    save_s, m = timed(save_tree, store, src.parent)
    digest = m.digest()
    t: dict[str, list] = {"mount": [], "mount2": [], "cp_al": []}
    for i in range(rounds):
        trees = root / f"trees-{i}"
        dt, tree = timed(tree_cache, store, digest, trees, root / "blobcache")
        t["mount"].append(dt)
        t["mount2"].append(timed(tree_cache, store, digest, trees, root / "blobcache")[0])
        assert count_files(tree) == 1
        t["cp_al"].append(sh(["cp", "-al", str(src.parent), str(root / f"al-{i}")]))
        remove_tree(trees)
        rm(root / f"al-{i}")
    blob = store.local_path(next(iter(m.blobs())))
    return {"times": t, "info": {"bytes": m.size, "save_s": save_s,
                                 "blob_allocated_bytes": os.stat(blob).st_blocks * 512 if blob else None}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="64 MiB, 1,000 files, 256 MiB sparse, 3 rounds (results: artifacts_quick.json)")
    ap.add_argument("--rounds", type=int, help="rounds per data set (default 7, quick 3)")
    ap.add_argument("--dvc-rounds", type=int, help="rounds with DVC (default 3 big / 2 small, quick 2)")
    ap.add_argument("--no-dvc", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="instead: time the parts of a save and of a first mount (bench/results/"
                         "artifacts_profile.json)")
    ap.add_argument("--dvc-venv", type=Path, default=DVC_VENV)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the data goes (default /tmp; must be the disk to measure)")
    a = ap.parse_args()
    big_size, small_count, sparse_size = (64 * MiB, 1000, 256 * MiB) if a.quick else (GiB, 10_000, 4 * GiB)
    rounds = a.rounds or (3 if a.quick else 7)
    dvc_big = a.dvc_rounds if a.dvc_rounds is not None else 2 if a.quick else 3
    dvc_small = a.dvc_rounds if a.dvc_rounds is not None else 2
    t_start = time.perf_counter()
    if a.profile:
        from _artifacts_profile import profile, report_profile

        work = Path(tempfile.mkdtemp(prefix="dstack-bench-artifacts-profile-", dir=a.workdir))
        try:
            res = profile(work, a.quick, a.rounds or 5)
        finally:
            rm(work)
        report_profile(res, a.quick)
        return

    work = Path(tempfile.mkdtemp(prefix="dstack-bench-artifacts-", dir=a.workdir))
    same_disk = os.stat(work).st_dev == os.stat(REPO).st_dev
    free_start = shutil.disk_usage(work).free
    print(f"work folder {work} (same filesystem as {REPO}: {same_disk}); "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    dvc = None
    dvc_version = None
    dvc_cli: list[float] = []
    if not a.no_dvc and ensure_dvc(a.dvc_venv):
        dvc = Dvc(a.dvc_venv, work / "dvc-site-cache", work / "dvc.log")
        dvc_version = dvc.call(op="version")["version"]
        dvc_cli = dvc.cli_start(3)
    try:
        print("making the data...", flush=True)
        data = work / "data"
        big = data / "big" / "blob.bin"
        small = data / "small"
        sparse = data / "sparse" / "sparse.bin"
        make_big(big, big_size)
        make_small(small, small_count)
        make_sparse(sparse, sparse_size)
        sync()
        env = {"create_us_start": create_probe(work / "probe-start"), "reflink": reflink_support(work),
               "fincore_big_before": fincore([big]),
               "fincore_small_before": fincore(sorted(small.rglob("*.bin"))[:200])}
        print(f"  file create: {env['create_us_start']:.0f} us; reflink on this disk: {env['reflink']}; "
              f"page cache: big {env['fincore_big_before']}, small (200-file sample) "
              f"{env['fincore_small_before']}", flush=True)
        res_big = run_set("big", big, work, rounds, dvc_big, dvc, keep_files=True, warmup=True)
        free_min = shutil.disk_usage(work).free
        res_small = run_set("small", small, work, rounds, dvc_small, dvc, keep_files=True, warmup=False)
        env["create_us_after_small"] = create_probe(work / "probe-after-small")
        free_min = min(free_min, shutil.disk_usage(work).free)
        print("  sparse", flush=True)
        res_sparse = run_sparse(sparse, work, rounds)
        env["fincore_big_after"] = fincore([big])
        free_min = min(free_min, shutil.disk_usage(work).free)
    finally:
        if dvc is not None:
            dvc.close()
        bench_s = time.perf_counter() - t_start
        print("deleting the work folder...", flush=True)
        cleanup_s = timed(rm, work)[0]
    print(f"  {cleanup_s:.1f} s", flush=True)

    tb, ts, tp = res_big["times"], res_small["times"], res_sparse["times"]
    B, S = size_label(big_size), f"{small_count:,} x 4 KiB"
    P = size_label(sparse_size)
    rows, checks = [], {}

    def row(key: str, measure: str, value: list[float], base_name: str, base: list[float] | None,
            target: str, limit: float, by_ratio: bool) -> None:
        v = med(value)
        r = ratio(value, base) if base else None
        got = r if by_ratio else v
        ok = got is not None and got < limit
        rows.append({"measure": measure, "value": fmt(v),
                     "baseline": f"{base_name} {fmt(med(base))}" if base else base_name,
                     "ratio": f"{r:.2f}x" if r is not None else "-", "target": target,
                     "result": "PASS" if ok else "FAIL"})
        checks[key] = {"value_s": v, "baseline": base_name, "baseline_s": med(base) if base else None,
                       "ratio": r, "target": target, "pass": ok}

    row("save_big", f"save {B}: a finished job's folder", tb["save"], "cp", tb["cp"], "< 1.5x cp", 1.5, True)
    row("save_small", f"save {S}: a finished job's folder", ts["save"], "cp -r", ts["cp"], "< 2x cp -r", 2.0,
        True)
    for key, label, tt in (("save2_big", B, tb), ("save2_small", S, ts)):
        row(key, f"save {label} again (the same files)", tt["save2"], "first save", tt["save"], "< 0.3x", 0.3,
            True)
    for key, label, tt in (("big", B, tb), ("small", S, ts)):
        row(f"mount_{key}", f"mount {label}: first (the tree the save planted)", tt["mount"], "cp -al",
            tt["cp_al"], "< 0.1 s", 0.1, False)
        row(f"mount2_{key}", f"mount {label}: again", tt["mount2"], "-", None, "< 0.1 s", 0.1, False)
    row("mount_sparse", f"mount {P} sparse: first (built from the manifest)", tp["mount"], "cp -al", tp["cp_al"],
        "< 0.1 s", 0.1, False)
    row("mount_cold_big", f"mount {B}: first, built from the manifest (nothing planted)", tb["mount_cold"],
        "cp -al", tb["cp_al"], "< 0.1 s", 0.1, False)

    informative = {
        "cp_plus_sync_big": [x + y for x, y in zip(tb["cp"], tb["cp_sync"], strict=True)],
        "save_plus_sync_big": [x + y for x, y in zip(tb["save"], tb["save_sync"], strict=True)],
        "cp_plus_sync_small": [x + y for x, y in zip(ts["cp"], ts["cp_sync"], strict=True)],
        "save_plus_sync_small": [x + y for x, y in zip(ts["save"], ts["save_sync"], strict=True)],
        "store_create": tb["store_create"] + ts["store_create"],
        "mount_cold_small (no planted tree)": ts["mount_cold"],
        "bind_mount_script": tb["bind"] + ts["bind"],
        "bind_floor_unshare_true": tb["bind_floor"] + ts["bind_floor"],
    }

    dvc_rows = []
    if dvc is not None:
        for label, tt in ((B, tb), (S, ts)):
            base = "cp" if tt is tb else "cp -r"
            n = len(tt["dvc_add"])
            ours = {k: tt[k][:n] for k in ("save", "save2", "mount", "mount2", "cp")}  # the rounds DVC ran in
            dvc_rows += [
                {"step": f"save {label}",
                 "dstack": f"save_tree {fmt(med(ours['save']))} "
                           f"({rx(ratio(ours['save'], ours['cp']), base)})",
                 "DVC": f"Repo.add {fmt(med(tt['dvc_add']))} ({rx(ratio(tt['dvc_add'], ours['cp']), base)})"},
                {"step": f"save again, unchanged {label}",
                 "dstack": f"save_tree {fmt(med(ours['save2']))} "
                           f"({rx(ratio(ours['save2'], ours['save']), 'first')})",
                 "DVC": f"Repo.add {fmt(med(tt['dvc_add2']))} "
                        f"({rx(ratio(tt['dvc_add2'], tt['dvc_add']), 'first')})"},
                {"step": f"mount / checkout {label}",
                 "dstack": f"tree_cache {fmt(med(ours['mount']))} (links)",
                 "DVC": f"checkout {fmt(med(tt['dvc_checkout']))} (default: copy); "
                        f"hardlink {fmt(med(tt['dvc_checkout_hl']))}"},
                {"step": f"mount again / checkout unchanged {label}",
                 "dstack": f"tree_cache {fmt(med(ours['mount2']))}",
                 "DVC": f"checkout {fmt(med(tt['dvc_checkout2']))} (copy); "
                        f"{fmt(med(tt['dvc_checkout_hl2']))} (hardlink)"},
            ]

    print(f"\n{rounds} rounds per data set, medians; load at end {os.getloadavg()[0]:.2f}; "
          f"data in page cache ({env['fincore_big_before']} for {B}); cannot drop caches here; file create "
          f"{env['create_us_start']:.0f} us at start, {env['create_us_after_small']:.0f} us after the "
          "small set\n")
    print_table(rows, ["measure", "value", "baseline", "ratio", "target", "result"])
    print("\ninformation (medians):")
    for k, v in informative.items():
        print(f"  {k:26s} {fmt(med(v))}")
    print(f"  save of {P} sparse (once)   {fmt(res_sparse['info']['save_s'])}")
    for label, tt, base in ((B, tb, "cp"), (S, ts, "cp -r")):
        print(f"  {label}: the same bytes in new files {fmt(med(tt['save_same_bytes']))} "
              f"({rx(ratio(tt['save_same_bytes'], tt['save']), 'first save')}); a save that copies "
              f"(store on another disk) {fmt(med(tt['save_copying']))} ({rx(ratio(tt['save_copying'], tt['cp']), base)})")
    if dvc is not None:
        print(f"\nDVC {dvc_version} (Python API in one process; `dvc version` CLI start alone: "
              f"{fmt(med(dvc_cli))}); default link: {res_big['info'].get('dvc_default_link')}; "
              f"hardlink: {res_big['info'].get('dvc_hardlink_link')}\n")
        print_table(dvc_rows, ["step", "dstack", "DVC"])
    print(f"\nwall time {bench_s:.0f} s (+ {cleanup_s:.0f} s cleanup); peak disk use about "
          f"{(free_start - free_min) / GiB:.1f} GiB (free-space drop, other sessions included)")

    write_results("artifacts_quick" if a.quick else "artifacts", {
        "quick": a.quick, "rounds": rounds, "dvc_rounds": {"big": dvc_big, "small": dvc_small},
        "sizes": {"big_bytes": big_size, "small_files": small_count, "small_file_bytes": 4096,
                  "sparse_bytes": sparse_size},
        "disk": {"workdir": str(work), "same_filesystem_as_repo": same_disk, **env,
                 "page_cache": "data written just before and resident (RAM >> data); "
                               "drop_caches not possible"},
        "checks": checks, "table": rows,
        "steps": {name: {k: stats(v) for k, v in tt.items() if v}
                  for name, tt in (("big", tb), ("small", ts), ("sparse", tp))},
        "set_info": {"big": res_big["info"], "small": res_small["info"], "sparse": res_sparse["info"]},
        "informative": {k: stats(v) for k, v in informative.items() if v},
        "dvc": None if dvc is None else {"version": dvc_version, "venv": str(a.dvc_venv),
                                         "cli_start": stats(dvc_cli), "table": dvc_rows},
        "wall_s": bench_s, "cleanup_s": cleanup_s, "peak_disk_use_bytes_approx": free_start - free_min,
    })


if __name__ == "__main__":
    main()
