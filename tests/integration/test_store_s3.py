"""The store in S3, against a real S3 API server on loopback (moto's server, see s3_server.py): the
same trees as the local store's tests, multipart uploads, the runner-side cache, verification of
downloads, a save killed halfway, and gc (including multipart uploads that never completed)."""

# ruff: noqa: F811  (pytest fixtures imported from s3_server and used as arguments)
from __future__ import annotations

import os
import stat
import time

import pytest
from s3_server import moto_s3, s3_config, s3_store  # noqa: F401  (fixtures)
from test_store_local import assert_same_tree, blob_count, kill_save_halfway, make_odd_tree, many_files

from dstack.core.errors import NotFound
from dstack.core.manifest import UnsafePath
from dstack.storage import gc
from dstack.storage.blobstore import open_store
from dstack.storage.hashing import IntegrityError, hash_file
from dstack.storage.s3 import S3BlobStore
from dstack.storage.save import save_tree
from dstack.storage.tree import BlobCache, materialise, tree_cache, verify_tree

MiB = 1 << 20


def _keys(store: S3BlobStore, sub: str) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=f"{store.prefix}/{sub}")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_odd_tree_round_trips_through_s3(s3_store, tmp_path):
    src = make_odd_tree(tmp_path / "out")
    m = save_tree(s3_store, src)
    assert _keys(s3_store, "manifests/") == [f"artifacts/v1/manifests/{m.digest()}.json"]
    assert len(_keys(s3_store, "blobs/")) == len(m.blobs())
    copy = tmp_path / "copy"
    materialise(s3_store, s3_store.get_manifest(m.digest()), copy, read_only=False)
    assert_same_tree(src, copy, exact_modes=True)
    dep = tmp_path / "dep"
    cache = BlobCache(tmp_path / "cache")
    materialise(s3_store, m, dep, cache=cache)
    assert_same_tree(src, dep, exact_modes=False)
    a = next(e for e in m.entries if e.path == "data/a.txt")
    assert (dep / "data" / "a.txt").stat().st_ino == cache.path(a.hash).stat().st_ino  # linked from the cache
    assert stat.S_IMODE(cache.path(a.hash).stat().st_mode) == 0o444


def test_large_sparse_file_goes_up_in_parts_and_comes_back_verified(s3_store, tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    with open(src / "disk.img", "wb") as f:
        f.truncate(64 * MiB)
        f.seek(40 * MiB)
        f.write(os.urandom(MiB))
    m = save_tree(s3_store, src)
    (entry,) = m.entries
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=f"{s3_store.prefix}/blobs/{entry.hash}")
    assert head["ContentLength"] == 64 * MiB and head["ETag"].strip('"').endswith("-8")  # 8 parts of 8 MiB
    dep = tmp_path / "dep"
    materialise(s3_store, m, dep, cache=tmp_path / "cache")
    assert hash_file(dep / "disk.img") == entry.hash


def test_identical_files_are_uploaded_once(s3_store, tmp_path):
    src = make_odd_tree(tmp_path / "out")
    first = save_tree(s3_store, src)
    blobs = blob_count(s3_store)
    assert save_tree(s3_store, src).digest() == first.digest() and blob_count(s3_store) == blobs
    other = tmp_path / "other"
    other.mkdir()
    (other / "same.txt").write_text("alpha\n")
    (other / "new.txt").write_text("new\n")
    save_tree(s3_store, other)
    assert blob_count(s3_store) == blobs + 1


def test_blobs_are_fetched_into_the_cache_once(s3_store, tmp_path):
    src = make_odd_tree(tmp_path / "out")
    m = save_tree(s3_store, src)
    cache = tmp_path / "cache"
    first = tree_cache(s3_store, m.digest(), tmp_path / "trees", cache)
    assert verify_tree(m, first) == []
    s3_store.client.delete_objects(Bucket=s3_store.bucket, Delete={
        "Objects": [{"Key": k} for k in _keys(s3_store, "blobs/")]})
    assert blob_count(s3_store) == 0
    again = tmp_path / "again"
    materialise(s3_store, m, again, cache=cache)  # everything comes from the cache now
    assert_same_tree(src, again, exact_modes=False)
    with pytest.raises(NotFound):
        materialise(s3_store, m, tmp_path / "no-cache")


def test_corrupt_object_is_refused_on_download(s3_store, tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    (src / "f").write_bytes(b"good" * 100)
    m = save_tree(s3_store, src)
    h = m.entries[0].hash
    s3_store.client.put_object(Bucket=s3_store.bucket, Key=f"{s3_store.prefix}/blobs/{h}", Body=b"evil" * 100)
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match="corrupt"):
        materialise(s3_store, m, tmp_path / "dep", cache=cache)
    assert not cache.path(h).exists() and list(cache.path(h).parent.iterdir()) == []  # nothing half-written
    with pytest.raises(IntegrityError):
        s3_store.put_bytes(b"not what the hash says", h)


def test_symlink_out_of_the_artifact_is_rejected(s3_store, tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    (src / "f").write_text("f")
    (src / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePath, match="points outside the artifact"):
        save_tree(s3_store, src)
    assert _keys(s3_store, "") == []


def test_killed_save_leaves_no_artifact_and_gc_removes_its_objects(s3_store, s3_config, tmp_path):
    src = many_files(tmp_path / "src", 120, size=1024)
    kill_save_halfway(s3_config, src, tmp_path)
    assert list(s3_store.iter_manifests()) == []
    left = blob_count(s3_store)
    assert left >= 25
    assert gc.collect(s3_store, set()).deleted_blobs == []  # within the grace period
    # an upload in parts that never completed, as a killed upload of a large file leaves (made after
    # the first gc: moto dates every multipart upload in 2010, long past any grace period)
    key = f"{s3_store.prefix}/blobs/{'0' * 64}"
    up = s3_store.client.create_multipart_upload(Bucket=s3_store.bucket, Key=key)
    s3_store.client.upload_part(Bucket=s3_store.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1,
                                Body=b"x" * (5 * MiB))
    result = gc.collect(s3_store, set(), grace_seconds=0)
    assert len(result.deleted_blobs) == left and len(result.aborted_uploads) == 1
    assert blob_count(s3_store) == 0
    assert s3_store.client.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", []) == []


def test_gc_keeps_what_live_artifacts_need(s3_store, tmp_path):
    keep = save_tree(s3_store, make_odd_tree(tmp_path / "keep"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("alpha\n")
    (other / "only-here").write_bytes(b"x" * 5000)
    drop = save_tree(s3_store, other)
    result = gc.collect(s3_store, {keep.digest()}, grace_seconds=0)
    assert result.deleted_manifests == [drop.digest()] and len(result.deleted_blobs) == 1
    assert not s3_store.has_manifest(drop.digest())
    assert verify_tree(keep, tree_cache(s3_store, keep.digest(), tmp_path / "trees", tmp_path / "cache")) == []


def test_open_store_builds_the_s3_backend(s3_config):
    store = open_store(s3_config)
    assert isinstance(store, S3BlobStore) and store.local_path("0" * 64) is None
    assert not store.has("0" * 64)


def test_reusing_an_old_blob_renews_its_time(s3_store, tmp_path, monkeypatch):
    src = tmp_path / "out"
    src.mkdir()
    (src / "f").write_bytes(b"reused" * 100)
    m = save_tree(s3_store, src)
    key = f"{s3_store.prefix}/blobs/{m.entries[0].hash}"
    before = s3_store.client.head_object(Bucket=s3_store.bucket, Key=key)["LastModified"]
    time.sleep(1.1)  # S3 times have whole seconds
    monkeypatch.setattr("dstack.storage.s3.TOUCH_AFTER", 0.5)  # "old" after half a second
    save_tree(s3_store, src)
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=key)
    assert head["LastModified"] > before and head["ContentLength"] == 600
    assert verify_tree(m, tree_cache(s3_store, m.digest(), tmp_path / "trees", tmp_path / "cache")) == []


def test_presigned_urls_move_a_blob_without_credentials(s3_store):
    """What the server hands a runner: URLs that work with no credentials at all, for one blob each."""
    import httpx

    from dstack.storage.hashing import hash_bytes

    data = os.urandom(1000)
    h = hash_bytes(data)
    assert httpx.put(s3_store.presign_put(h, len(data)), content=data).status_code == 200
    assert s3_store.has(h)
    r = httpx.get(s3_store.presign_get(h), headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert "X-Amz-Signature=" in s3_store.presign_get(h)  # SigV4, which every AWS region takes


def test_a_blob_goes_up_in_parts_by_presigned_urls_and_the_upload_goes_on(s3_store):
    import httpx

    from dstack.storage.hashing import hash_bytes

    part = 5 * MiB  # S3's smallest part but the last
    data = os.urandom(2 * part + 1000)
    h = hash_bytes(data)
    upload = s3_store.start_parts(h)
    assert httpx.put(s3_store.presign_part(h, upload, 1), content=data[:part]).status_code == 200
    # cut here: the next start finds the same upload and the part it has
    assert s3_store.start_parts(h) == upload and set(s3_store.uploaded_parts(h, upload)) == {1}
    with pytest.raises(IntegrityError, match="has 1 parts"):
        s3_store.finish_parts(h, upload, len(data))  # not all there yet: nothing published
    assert not s3_store.has(h)
    for number, start in ((2, part), (3, 2 * part)):
        chunk = data[start:start + part]
        assert httpx.put(s3_store.presign_part(h, upload, number), content=chunk).status_code == 200
    s3_store.finish_parts(h, upload, len(data))
    assert s3_store.has(h) and s3_store.blob_size(h) == len(data)
    with pytest.raises(NotFound):
        s3_store.uploaded_parts(h, upload)  # completed: gone
