"""The content-addressed store in a local folder, on the real filesystem: saving trees, building them
again (hard links, cache, copies), traversal attacks, a save killed halfway, and garbage collection."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dstack.core.errors import NotFound
from dstack.core.manifest import EMPTY_HASH, Entry, Manifest, UnsafePath
from dstack.storage import gc
from dstack.storage.blobstore import LocalBlobStore, open_store
from dstack.storage.hashing import IntegrityError, hash_file
from dstack.storage.save import save_tree
from dstack.storage.tree import (
    BlobCache,
    artifact_source,
    materialise,
    remove_tree,
    tree_cache,
    verify_tree,
)

GiB = 1 << 30
MiB = 1 << 20


# ---- helpers, also used by test_store_s3 ----


def make_odd_tree(root: Path) -> Path:
    """Empty folders, symlinks (to a file, to a folder, dangling), unicode names, an empty file, an
    executable, unusual modes, and two files with the same content."""
    root.mkdir(parents=True)
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("alpha\n")
    (root / "data" / "same-as-a.txt").write_text("alpha\n")
    (root / "data" / "zero").touch()
    (root / "données" / "日本語").mkdir(parents=True)
    (root / "données" / "日本語" / "ファイル 🚀.txt").write_text("unicode\n")
    run = root / "bin" / "run.sh"
    run.parent.mkdir()
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    secret = root / "data" / "private"
    secret.write_bytes(os.urandom(1000))
    secret.chmod(0o600)
    (root / "locked").mkdir(mode=0o700)
    (root / "locked" / "x").write_text("x")
    (root / "data" / "link-to-a").symlink_to("a.txt")
    (root / "bin" / "up-link").symlink_to("../data/a.txt")
    (root / "data-link").symlink_to("data")
    (root / "dangling").symlink_to("data/not-there")
    return root


def tree_listing(root: Path) -> dict[str, tuple]:
    """path -> (kind, exact mode, size, content hash | symlink target) for everything below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", None, None, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None, None)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, hash_file(p))
    return out


def assert_same_tree(src: Path, dest: Path, exact_modes: bool) -> None:
    a, b = tree_listing(src), tree_listing(dest)
    assert sorted(a) == sorted(b)
    for rel, (kind, mode, size, what) in a.items():
        kind2, mode2, size2, what2 = b[rel]
        assert (kind, size, what) == (kind2, size2, what2), rel
        if kind == "symlink":
            continue
        if exact_modes:
            assert mode == mode2, f"{rel}: {oct(mode)} != {oct(mode2)}"
        else:  # read-only build: 0555 folders and executables, 0444 other files
            want = 0o555 if kind == "dir" or mode & 0o111 else 0o444
            assert mode2 == want, f"{rel}: {oct(mode2)} != {oct(want)}"


def blob_count(store) -> int:
    return sum(1 for _ in store.iter_blobs())


KILLED_SAVE = r"""
import json, sys, time
from pathlib import Path
from dstack.storage.blobstore import open_store
from dstack.storage.save import save_tree

config, src, marker = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
store = open_store(config)
real_put, count = type(store).put_bytes, [0]

def put_bytes(self, data, h, **kw):  # the real write, then: pause halfway so the test can kill us
    real_put(self, data, h, **kw)
    count[0] += 1
    if count[0] >= 25:  # every worker stops here
        marker.write_text("halfway")
        time.sleep(600)

type(store).put_bytes = put_bytes
save_tree(store, src, workers=4)
print("finished")
"""


def kill_save_halfway(config: dict, src: Path, tmp: Path) -> None:
    """Run save_tree in another process and SIGKILL it once it has stored part of the tree."""
    marker = tmp / f"marker-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, json.dumps(config), str(src), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the save ended before it was killed ({proc.returncode}):\n{out.decode()}{err.decode()}")
        assert time.monotonic() < deadline, "the save never got halfway"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


def many_files(root: Path, n: int, size: int = 4096) -> Path:
    for i in range(n):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}").write_bytes(i.to_bytes(4, "little") * (size // 4))
    return root


# ---- fixtures ----


@pytest.fixture
def store(tmp_path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


@pytest.fixture
def odd_tree(tmp_path) -> Path:
    return make_odd_tree(tmp_path / "job" / "out")


# ---- round trips ----


def test_odd_tree_round_trips_as_a_writable_copy(store, odd_tree, tmp_path):
    m = save_tree(store, odd_tree)
    assert store.has_manifest(m.digest())
    dest = tmp_path / "copy"
    materialise(store, store.get_manifest(m.digest()), dest, read_only=False)
    assert_same_tree(odd_tree, dest, exact_modes=True)
    assert verify_tree(m, dest) == []
    assert not any((dest / e.path).stat().st_ino == (odd_tree / e.path).stat().st_ino
                   for e in m.entries if e.kind == "file")


def test_executable_keeps_its_bits_and_symlinks_stay_links(store, odd_tree, tmp_path):
    m = save_tree(store, odd_tree)
    by_path = {e.path: e for e in m.entries}
    assert by_path["bin/run.sh"].mode == 0o755
    assert by_path["data/private"].mode == 0o600
    assert by_path["data/link-to-a"].kind == "symlink" and by_path["data/link-to-a"].target == "a.txt"
    assert by_path["data-link"].target == "data"
    assert by_path["data/zero"].hash == EMPTY_HASH and by_path["data/zero"].size == 0
    dest = tmp_path / "ro"
    materialise(store, m, dest, cache=tmp_path / "cache")
    assert os.access(dest / "bin" / "run.sh", os.X_OK)
    assert (dest / "data-link" / "a.txt").read_text() == "alpha\n"
    assert (dest / "bin" / "up-link").read_text() == "alpha\n"


def test_dependency_is_hard_links_to_read_only_blobs(store, odd_tree, tmp_path):
    m = save_tree(store, odd_tree)
    dest = tmp_path / "dep"
    materialise(store, m, dest, cache=tmp_path / "cache")
    assert_same_tree(odd_tree, dest, exact_modes=False)
    for e in m.entries:
        if e.kind != "file" or not e.size:
            continue
        blob = store.local_path(e.hash)
        assert stat.S_IMODE(blob.stat().st_mode) == 0o444
        if e.mode & 0o111:  # an executable links to a 0555 copy in the runner's cache
            assert (dest / e.path).stat().st_ino == BlobCache(tmp_path / "cache").path(e.hash, True).stat().st_ino
        else:
            assert (dest / e.path).stat().st_ino == blob.stat().st_ino


def test_dependency_write_fails_and_store_is_untouched(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 10000)
    m = save_tree(store, src)
    base = Path(f"/tmp/dstack-ro-{uuid.uuid4().hex[:8]}")  # traversable by an unprivileged user
    base.mkdir(mode=0o755)
    try:
        dest = base / "dep"
        materialise(store, m, dest)
        as_user = {"user": 65534} if os.geteuid() == 0 else {}  # root writes anything: be someone else
        for script in (f"echo evil >> '{dest}/weights.bin'", f"touch '{dest}/new'"):
            p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, **as_user)
            assert p.returncode != 0 and "Permission denied" in p.stderr
        assert verify_tree(m, dest) == []
        assert hash_file(store.local_path(m.entries[0].hash)) == m.entries[0].hash
    finally:
        remove_tree(base)


def test_sparse_2gib_file_round_trips_without_being_filled(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "sparse.img"
    with open(big, "wb") as f:
        f.truncate(2 * GiB)
        for offset in (0, GiB, 2 * GiB - 4096):
            f.seek(offset)
            f.write(b"data" * 1024)
    m = save_tree(store, src)
    (entry,) = m.entries
    assert entry.size == 2 * GiB
    blob = store.local_path(entry.hash)
    assert blob.stat().st_size == 2 * GiB and blob.stat().st_blocks * 512 < 64 * MiB  # holes kept
    dep = tmp_path / "dep"
    materialise(store, m, dep)
    assert (dep / "sparse.img").stat().st_ino == blob.stat().st_ino
    copy = tmp_path / "copy"
    materialise(store, m, copy, read_only=False)  # verified copy, holes kept
    assert (copy / "sparse.img").stat().st_blocks * 512 < 64 * MiB
    with open(copy / "sparse.img", "rb") as f:
        f.seek(GiB)
        assert f.read(8) == b"datadata"
    assert hash_file(copy / "sparse.img") == entry.hash


def test_ten_thousand_small_files_with_few_file_descriptors(store, tmp_path):
    src = many_files(tmp_path / "src", 10_000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        m = save_tree(store, src, workers=8)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert m.files == 10_000 and blob_count(store) == 10_000
    tree = tree_cache(store, m.digest(), tmp_path / "trees")
    assert verify_tree(m, tree) == []
    assert sorted(os.listdir(tree / "d042")) == sorted(os.listdir(src / "d042"))


def test_identical_files_are_stored_once(store, odd_tree, tmp_path):
    first = save_tree(store, odd_tree)
    blobs = blob_count(store)
    assert blobs == len(first.blobs()) == first.files - 2  # one empty file, one duplicate
    again = save_tree(store, odd_tree)
    assert again.digest() == first.digest() and blob_count(store) == blobs
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "a-copy.txt").write_text("alpha\n")
    (other / "new.txt").write_text("new\n")
    save_tree(store, other)
    assert blob_count(store) == blobs + 1


def test_large_file_saved_twice_is_stored_once(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(MiB) * 24  # above the size where the local store copies while hashing
    (src / "ckpt.bin").write_bytes(data)
    m = save_tree(store, src)
    assert blob_count(store) == 1 and hash_file(store.local_path(m.entries[0].hash)) == m.entries[0].hash
    other = tmp_path / "other"
    other.mkdir()
    (other / "same.bin").write_bytes(data)
    # flip a bit (a fixed byte such as b"!" may be the random byte already: 2 draws in 256 then
    # leave a copy of `data`, rightly deduplicated)
    (other / "changed.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    inside = bytes([data[5 * MiB] ^ 1])
    (other / "changed-inside.bin").write_bytes(data[:5 * MiB] + inside + data[5 * MiB + 1:])  # looks the same
    m2 = save_tree(store, other)
    assert blob_count(store) == 3
    assert verify_tree(m2, tree_cache(store, m2.digest(), tmp_path / "trees")) == []


# ---- traversal and hostile input ----


@pytest.mark.parametrize("target", ["/etc", "/etc/passwd", "../../x", "../../sibling", "../sub/../../x"])
def test_symlink_out_of_the_artifact_is_rejected(store, tmp_path, target):
    src = tmp_path / "job" / "out"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("f")
    (src / "sub" / "evil").symlink_to(target)
    with pytest.raises(UnsafePath, match="symlink 'sub/evil' points outside the artifact"):
        save_tree(store, src)
    assert list(store.iter_manifests()) == [] and blob_count(store) == 0


def test_symlink_escaping_through_another_symlink_is_rejected(store, tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    (src / "self").symlink_to(".")  # harmless alone
    (src / "escape").symlink_to("self/..")  # lexically "." but really the parent folder
    with pytest.raises(UnsafePath, match="'escape'"):
        save_tree(store, src)


@pytest.mark.parametrize("path", ["../x", "/etc", "a/../../b", "data/../.."])
def test_artifact_path_outside_the_job_folder_is_rejected(tmp_path, path):
    (tmp_path / "job").mkdir()
    with pytest.raises(UnsafePath):
        artifact_source(tmp_path / "job", path)


def test_artifact_folder_that_is_a_symlink_out_of_the_job_is_rejected(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "out").symlink_to(tmp_path)
    with pytest.raises(UnsafePath, match="leads outside the job's folder"):
        artifact_source(job, "out")
    (job / "real").mkdir()
    (job / "alias").symlink_to("real")
    assert artifact_source(job, "./alias/") == (job / "real").resolve()


def test_file_name_that_is_not_utf8_is_rejected(store, tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    (src / os.fsdecode(b"bad-\xff-name")).write_text("x")
    with pytest.raises(UnsafePath, match="not valid UTF-8"):
        save_tree(store, src)


def test_fifo_is_skipped_without_hanging(store, tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    os.mkfifo(src / "pipe")
    (src / "f").write_text("f")
    m = save_tree(store, src)
    assert [e.path for e in m.entries] == ["f"]


def _store_raw_manifest(store: LocalBlobStore, doc: dict) -> str:
    """Put hostile manifest bytes into the store under their true digest, as an attacker could."""
    from blake3 import blake3

    data = json.dumps(doc).encode()
    digest = blake3(data).hexdigest()
    (store.manifests / f"{digest}.json").write_bytes(data)
    return digest


H = "ab" * 32


@pytest.mark.parametrize("entries", [
    [{"path": "../evil", "kind": "file", "mode": 420, "size": 1, "hash": H}],
    [{"path": "/tmp/evil", "kind": "file", "mode": 420, "size": 1, "hash": H}],
    [{"path": "a/../../evil", "kind": "file", "mode": 420, "size": 1, "hash": H}],
    [{"path": "link", "kind": "symlink", "mode": 511, "target": "/tmp"},
     {"path": "link/evil", "kind": "file", "mode": 420, "size": 1, "hash": H}],
    [{"path": "link", "kind": "symlink", "mode": 511, "target": ".."}],
    [{"path": "orphan/evil", "kind": "file", "mode": 420, "size": 1, "hash": H}],
])
def test_malicious_manifest_is_refused_before_anything_is_written(store, tmp_path, entries):
    digest = _store_raw_manifest(store, {"version": 1, "entries": entries})
    with pytest.raises(IntegrityError):
        store.get_manifest(digest)
    with pytest.raises(IntegrityError):
        tree_cache(store, digest, tmp_path / "trees")
    assert not (tmp_path / "trees").exists() or os.listdir(tmp_path / "trees") == []
    with pytest.raises((UnsafePath, ValueError)):
        Manifest(entries=[Entry(**e) for e in entries])


def test_corrupt_blob_is_detected_on_fetch(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"good" * 1000)
    m = save_tree(store, src)
    blob = store.local_path(m.entries[0].hash)
    blob.chmod(0o644)
    blob.write_bytes(b"evil" * 1000)
    with pytest.raises(IntegrityError, match="corrupt"):
        store.fetch(m.entries[0].hash, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()
    with pytest.raises(IntegrityError):
        materialise(store, m, tmp_path / "copy", read_only=False)
    assert verify_tree(m, tree_cache(store, m.digest(), tmp_path / "trees")) != []  # links: verify finds it


def test_missing_things_are_not_found(store, tmp_path):
    with pytest.raises(NotFound):
        store.get_manifest("0" * 64)
    with pytest.raises(NotFound):
        store.fetch("0" * 64, tmp_path / "x")
    with pytest.raises(NotFound):
        save_tree(store, tmp_path / "nothing-here")
    (tmp_path / "d").mkdir()
    materialise(store, Manifest(), tmp_path / "d" / "empty")
    with pytest.raises(Exception, match="exists already"):
        materialise(store, Manifest(), tmp_path / "d")


# ---- building dependencies ----


def test_mounting_the_same_dependency_again_is_instant(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.bin", "wb") as f:
        f.truncate(GiB)  # size must not matter
        f.write(b"header")
    m = save_tree(store, src)
    t = time.perf_counter()
    first = tree_cache(store, m.digest(), tmp_path / "trees")
    assert time.perf_counter() - t < 0.5
    t = time.perf_counter()
    assert tree_cache(store, m.digest(), tmp_path / "trees") == first
    assert time.perf_counter() - t < 0.01
    assert (first / "big.bin").stat().st_ino == store.local_path(m.entries[0].hash).stat().st_ino
    assert stat.S_IMODE(first.stat().st_mode) == 0o555
    assert [p.name for p in (tmp_path / "trees").iterdir()] == [m.digest()]  # no temporary folders left


def test_dependency_on_another_filesystem_goes_through_the_cache(store, odd_tree, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    m = save_tree(store, odd_tree)
    base = shm / f"dstack-test-{uuid.uuid4().hex[:8]}"
    try:
        materialise(store, m, base / "dep", cache=base / "cache")
        assert_same_tree(odd_tree, base / "dep", exact_modes=False)
        cached = BlobCache(base / "cache").path(next(e.hash for e in m.entries if e.path == "data/a.txt"))
        assert (base / "dep" / "data" / "a.txt").stat().st_ino == cached.stat().st_ino
        materialise(store, m, base / "dep2")  # no cache: verified copies
        assert_same_tree(odd_tree, base / "dep2", exact_modes=False)
    finally:
        remove_tree(base)


# ---- a save killed halfway, and gc ----


def test_killed_save_leaves_no_artifact_and_gc_removes_its_blobs(store, tmp_path):
    src = many_files(tmp_path / "src", 300)
    kill_save_halfway({"type": "local", "path": str(store.root)}, src, tmp_path)
    assert list(store.iter_manifests()) == []
    left = blob_count(store)
    assert left >= 25
    assert gc.collect(store, set()).deleted_blobs == []  # within the grace period: maybe an upload in flight
    result = gc.collect(store, set(), grace_seconds=0)
    assert len(result.deleted_blobs) == left and result.bytes_freed >= left * 4096
    assert blob_count(store) == 0 and os.listdir(store.tmp) == []
    m = save_tree(store, src)  # and the store works on
    assert blob_count(store) == 300 and store.has_manifest(m.digest())


def test_gc_keeps_what_live_artifacts_need(store, odd_tree, tmp_path):
    keep = save_tree(store, odd_tree)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("alpha\n")  # shared with `keep`
    (other / "only-here").write_bytes(b"x" * 5000)
    drop = save_tree(store, other)
    stale = store.tmp / "leftover-of-a-killed-rename"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    dry = gc.collect(store, {keep.digest()}, grace_seconds=0, dry_run=True)
    assert dry.deleted_manifests == [drop.digest()] and len(dry.deleted_blobs) == 1
    assert dry.aborted_uploads == ["leftover-of-a-killed-rename"]
    assert store.has_manifest(drop.digest()) and stale.exists()
    done = gc.collect(store, {keep.digest()}, grace_seconds=0)
    assert done.deleted_manifests == dry.deleted_manifests and done.deleted_blobs == dry.deleted_blobs
    assert done.bytes_freed >= 5000 and not stale.exists()
    assert not store.has_manifest(drop.digest())
    assert verify_tree(keep, tree_cache(store, keep.digest(), tmp_path / "trees")) == []


def test_gc_spares_an_old_blob_that_a_new_save_reuses(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"reused" * 100)
    old = save_tree(store, src)
    blob = store.local_path(old.entries[0].hash)
    os.utime(blob, (0, 0))  # unreferenced and long past the grace period...
    store.delete_manifest(old.digest())
    again = tmp_path / "again"
    again.mkdir()
    (again / "g").write_bytes(b"reused" * 100)
    new = save_tree(store, again)  # ...until a save reuses it: that touches it
    data = (store.manifests / f"{new.digest()}.json").read_bytes()
    store.delete_manifest(new.digest())  # as if gc ran just before that save put its manifest
    assert gc.collect(store, set(), grace_seconds=60).deleted_blobs == []
    (store.manifests / f"{new.digest()}.json").write_bytes(data)
    assert blob.exists() and verify_tree(new, tree_cache(store, new.digest(), tmp_path / "trees")) == []


def test_open_store_defaults_to_dstack_home(dstack_home):
    store = open_store({"type": "local"})
    assert isinstance(store, LocalBlobStore) and store.root == dstack_home / "storage"
    with pytest.raises(NotFound, match="unknown artifact store type"):
        open_store({"type": "ftp"})
