"""Saving a finished job's folder without copying it (dstack.storage.save): files adopted as blobs by
hard link, hashes kept on the files, and the folder planted as its manifest's read-only tree. Real
files on this machine's disk, real leases held by other real processes."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_store_local import assert_same_tree, make_odd_tree

from dstack.storage.blobstore import LocalBlobStore
from dstack.storage.hashing import hash_bytes, hash_file
from dstack.storage.save import HASH_XATTR, save_tree
from dstack.storage.tree import remove_tree, tree_cache, verify_tree


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


def blob_of(store: LocalBlobStore, path: Path) -> os.stat_result:
    return os.stat(store.local_path(hash_file(path)))


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_a_file_nobody_else_reaches_becomes_the_blob(store, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "model.bin").write_bytes(os.urandom(6 << 20))  # above the small-file size
    (job / "small.txt").write_text("small\n")
    m = save_tree(store, job, adopt=True)
    for name in ("model.bin", "small.txt"):
        st = os.stat(job / name)
        assert same_inode(st, blob_of(store, job / name)), name
        assert stat.S_IMODE(st.st_mode) == 0o444  # read-only from now on
    modes = {e.path: e.mode for e in m.entries}
    assert modes["model.bin"] == 0o644  # the manifest keeps the mode the job gave it


def test_a_file_still_open_elsewhere_is_copied_and_the_blob_keeps_its_content(store, tmp_path):
    """A process that outlived the job and still holds a file open for writing: the file is copied,
    so what it writes later never reaches the stored blob."""
    job = tmp_path / "job"
    job.mkdir()
    log = job / "train.log"
    log.write_text("epoch 1\n")
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; f=open(sys.argv[1],'a'); print('ready',flush=True); sys.stdin.readline(); "
         "f.write('written after the save\\n'); f.close()", str(log)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        save_tree(store, job, adopt=True)
        blob = store.local_path(hash_bytes(b"epoch 1\n"))
        assert not same_inode(os.stat(log), os.stat(blob))
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(timeout=10) == 0
    finally:
        writer.kill()
    assert log.read_text() == "epoch 1\nwritten after the save\n"
    assert blob.read_text() == "epoch 1\n"
    assert hash_file(blob) == blob.name


def test_a_file_linked_elsewhere_or_executable_is_copied(store, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "shared.txt").write_text("shared\n")
    os.link(job / "shared.txt", tmp_path / "elsewhere.txt")  # someone else can write through this name
    run = job / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    m = save_tree(store, job, adopt=True)
    assert not same_inode(os.stat(job / "shared.txt"), blob_of(store, job / "shared.txt"))
    assert not same_inode(os.stat(run), blob_of(store, run))
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o755
    assert {e.path: e.mode for e in m.entries}["run.sh"] == 0o755
    assert stat.S_IMODE(blob_of(store, run).st_mode) == 0o444


def test_content_the_store_has_is_not_stored_again(store, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
        (d / "f").write_text("same\n")
    save_tree(store, first, adopt=True)
    save_tree(store, second, adopt=True)
    assert same_inode(os.stat(first / "f"), blob_of(store, first / "f"))
    assert not same_inode(os.stat(second / "f"), blob_of(store, first / "f"))
    assert len([b for b in store.iter_blobs()]) == 1


def test_a_remembered_hash_is_used_only_for_the_blobs_own_unchanged_inode(store, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    f = job / "data.bin"
    f.write_bytes(b"A" * 5000)
    m1 = save_tree(store, job, adopt=True)
    h = hash_bytes(b"A" * 5000)
    assert os.getxattr(f, HASH_XATTR)[:32].hex() == h
    assert [e.hash for e in save_tree(store, job).entries] == [e.hash for e in m1.entries]

    def rewrite(path: Path, data: bytes, keep_mtime: bool) -> None:
        st = path.stat()
        os.chmod(path, 0o644)
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, data, 0)
        os.close(fd)
        if keep_mtime:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def saved_hash(folder: Path) -> str:
        return {e.path: e.hash for e in save_tree(store, folder).entries}["data.bin"]

    # the blob's mtime moved (gc's touch): read once, then remembered with the new stamp
    os.utime(f, ns=(1, 10**18))
    assert saved_hash(job) == h
    assert os.getxattr(f, HASH_XATTR)[32:] == struct.pack("<QQ", 5000, f.stat().st_mtime_ns)
    # the same inode, same size and mtime: the remembered hash stands, the file is not read
    # (shown here by changing its bytes behind the store's back, which nothing else would do)
    rewrite(f, b"Z" * 5000, keep_mtime=True)
    assert saved_hash(job) == h
    # changed in place (new mtime): read and hashed again
    rewrite(f, b"B" * 5000, keep_mtime=False)
    assert saved_hash(job) == hash_bytes(b"B" * 5000)
    # an attribute that names another stored blob is not trusted
    other = hash_bytes(b"other")
    store.put_bytes(b"other", other)
    g = job / "forged.bin"
    g.write_bytes(b"F" * 5000)
    os.link(g, tmp_path / "second-name")  # two links, as a blob's own inode has
    st = g.stat()
    os.setxattr(g, HASH_XATTR, bytes.fromhex(other) + struct.pack("<QQ", st.st_size, st.st_mtime_ns))
    assert {e.path: e.hash for e in save_tree(store, job).entries}["forged.bin"] == hash_bytes(b"F" * 5000)
    # a copy that carries the attribute along (cp -a) is another inode: read and hashed again
    save_tree(store, job, adopt=True)
    copy_dir = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(job), str(copy_dir)], check=True)
    rewrite(copy_dir / "data.bin", b"D" * 5000, keep_mtime=True)
    assert saved_hash(copy_dir) == hash_bytes(b"D" * 5000)


def test_the_saved_folder_becomes_the_tree_that_mounts_reuse(store, tmp_path):
    job = make_odd_tree(tmp_path / "job")
    (job / "escape").symlink_to("../../outside")
    os.mkfifo(job / "fifo")
    (job / "dedup.txt").write_text("stored before\n")
    store.put_bytes(b"stored before\n", hash_bytes(b"stored before\n"))
    expected = tmp_path / "expected"
    subprocess.run(["cp", "-a", str(job), str(expected)], check=True)
    (expected / "escape").unlink()
    (expected / "fifo").unlink()
    warnings = []
    trees = store.root / "trees"
    m = save_tree(store, job, adopt=True, trees=trees, cache=tmp_path / "cache", warn=warnings.append)
    assert not job.exists()  # moved, not copied
    tree = trees / m.digest()
    assert verify_tree(m, tree) == []
    assert_same_tree(expected, tree, exact_modes=False)
    assert len(warnings) == 1 and "escape" in warnings[0]
    # every non-executable file is its blob's own inode, the deduplicated one included
    for e in m.entries:
        if e.kind == "file" and e.size and not e.mode & 0o111:
            assert same_inode(os.stat(tree / e.path), os.stat(store.local_path(e.hash))), e.path
    assert tree_cache(store, m.digest(), trees) == tree  # a mount reuses it as it is


def test_planting_where_the_tree_exists_leaves_the_folder_and_the_tree_alone(store, tmp_path):
    trees = store.root / "trees"
    for name in ("one", "two"):
        d = tmp_path / name
        d.mkdir()
        (d / "f.txt").write_text("same tree\n")
    m1 = save_tree(store, tmp_path / "one", adopt=True, trees=trees)
    before = os.stat(trees / m1.digest() / "f.txt")
    m2 = save_tree(store, tmp_path / "two", adopt=True, trees=trees)
    assert m1.digest() == m2.digest()
    assert (tmp_path / "two" / "f.txt").read_text() == "same tree\n"  # the caller removes it
    assert same_inode(before, os.stat(trees / m1.digest() / "f.txt"))
    remove_tree(tmp_path / "two")


def test_adopted_blobs_are_fresh_for_gc(store, tmp_path):
    """An adopted file keeps no old mtime: gc's grace period protects it until its manifest exists."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "old.bin").write_bytes(b"old" * 1000)
    os.utime(job / "old.bin", (time.time() - 10 * 86400,) * 2)
    save_tree(store, job, adopt=True)
    assert time.time() - blob_of(store, job / "old.bin").st_mtime < 60


def test_a_job_file_with_a_future_time_gets_a_present_one(store, tmp_path):
    """Else gc, which deletes only what is older than its grace period, would never take the blob."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "future.bin").write_bytes(b"f" * 100)
    os.utime(job / "future.bin", (4102444800,) * 2)  # 2100-01-01
    save_tree(store, job, adopt=True)
    assert blob_of(store, job / "future.bin").st_mtime <= time.time() + 1


def test_an_adopted_blob_belongs_to_the_runner_not_to_the_jobs_user(store, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can hand files to another user")
    job = tmp_path / "job"
    (job / "sub").mkdir(parents=True)
    (job / "sub" / "out.txt").write_text("made by uid 1000\n")
    for p in (job, job / "sub", job / "sub" / "out.txt"):
        os.chown(p, 1000, 1000)  # as a container with `USER 1000` leaves them
    m = save_tree(store, job, adopt=True, trees=store.root / "trees")
    tree = store.root / "trees" / m.digest()
    blob = blob_of(store, tree / "sub" / "out.txt")
    assert same_inode(blob, os.stat(tree / "sub" / "out.txt"))
    assert (blob.st_uid, stat.S_IMODE(blob.st_mode)) == (0, 0o444)
    assert {os.stat(p).st_uid for p in (tree, tree / "sub")} == {0}


def test_someone_opening_the_file_is_seen_and_the_adoption_taken_back(store, tmp_path):
    """The primitives the save relies on: a pending open shows as a broken lease, and a blob linked
    meanwhile is removed again while it is still that file."""
    from dstack.storage.save import _lease_holds, _seal

    f = tmp_path / "f.txt"
    f.write_text("x\n")
    fd = os.open(f, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        assert _seal(fd, st) and _lease_holds(fd)
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o444  # read-only before the lease: no new writer
        h = hash_bytes(b"x\n")
        assert store.adopt(fd, h)
        opener = subprocess.Popen([sys.executable, "-c", f"open({str(f)!r}).read()"])
        deadline = time.monotonic() + 10
        while _lease_holds(fd) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _lease_holds(fd)  # its open waits for us, and we can tell
        store.unlink_if(h, st)
        assert not store.has(h)
    finally:
        os.close(fd)
    assert opener.wait(timeout=10) == 0


def test_a_file_open_elsewhere_keeps_its_mode(store, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "held.txt").write_text("held\n")
    holder = open(job / "held.txt")  # noqa: SIM115
    try:
        m = save_tree(store, job, adopt=True)
    finally:
        holder.close()
    assert stat.S_IMODE(os.stat(job / "held.txt").st_mode) == 0o644
    assert {e.path: e.mode for e in m.entries}["held.txt"] == 0o644


def test_a_tree_that_cannot_be_planted_leaves_the_save_whole(store, tmp_path):
    """Planting is an optimisation: when it fails halfway, the artifact is saved all the same."""
    import fcntl as _fcntl

    job = tmp_path / "job"
    (job / "locked").mkdir(parents=True)
    (job / "locked" / "f.txt").write_text("f\n")
    FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x40086602, 0x10

    def immutable(path: Path, on: bool) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", FS_IMMUTABLE_FL if on else 0))
        finally:
            os.close(fd)

    try:
        immutable(job / "locked", True)
    except OSError:
        pytest.skip("cannot make a folder immutable here")
    trees = store.root / "trees"
    try:
        m = save_tree(store, job, adopt=True, trees=trees)  # chmod of 'locked' fails: EPERM
        assert store.has_manifest(m.digest())
        assert not (trees / m.digest()).exists()
    finally:
        for p in list(trees.glob(".tmp-*/locked")) + [job / "locked"]:
            if p.exists():
                immutable(p, False)


def test_a_blobs_own_inode_is_known_after_many_fresh_files_too(store, tmp_path):
    """After 64 files without a remembered hash the save stops asking for one; a blob's own inode
    that comes later is still recognised (read once) and stays in the planted tree."""
    store.put_bytes(b"dependency data\n", hash_bytes(b"dependency data\n"))
    blob = store.local_path(hash_bytes(b"dependency data\n"))
    job = tmp_path / "job"
    job.mkdir()
    for i in range(100):
        (job / f"f{i:03d}.txt").write_text(f"fresh {i}\n")
    (job / "z").mkdir()
    os.link(blob, job / "z" / "dep.txt")  # as `cp -al` of a mounted dependency makes
    m = save_tree(store, job, adopt=True, trees=store.root / "trees")
    tree = store.root / "trees" / m.digest()
    assert verify_tree(m, tree) == []
    assert same_inode(os.stat(tree / "z" / "dep.txt"), os.stat(blob))
