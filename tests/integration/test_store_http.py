"""Artifacts through the server's HTTP API (issue 14, point 2): a runner's JobStore against a real server, as a
runner on another machine uses it; what a runner token may move, and resuming after cuts."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from tests.dstack_server import Server

from dstack.core.errors import DstackError, Forbidden
from dstack.core.manifest import Entry, Manifest
from dstack.runner.client import ServerClient
from dstack.runner.transfer import JobStore, Transfers
from dstack.storage.cache import BlobCache
from dstack.storage.hashing import IntegrityError, hash_bytes
from dstack.storage.save import save_tree
from dstack.storage.tree import tree_cache, verify_tree

WORKFLOWS = """\
workflows:
  - name: prepare
    commands: [make data]
    artifacts: [data]
  - name: train
    commands: [train]
    dependencies: [prepare]
    artifacts: [out]
  - name: plain
    commands: [true]
"""
BIG = 6 << 20  # above SMALL_FILE: saved by put_file, in pieces


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server-home")
    yield s
    s.stop()


def job_store(server: Server, http, name: str, job_id: str, presigned: bool = False) -> JobStore:
    token = http.headers["authorization"].split()[1]
    return Transfers(ServerClient(server.url, token), presigned).for_job(name, job_id)


def make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "small.txt").write_text("hello\n")
    (root / "sub" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (root / "sub" / "tool.sh").chmod(0o755)
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("sub/tool.sh")
    return root


def prepared(server: Server, tmp_path: Path):
    """A DONE `prepare` whose `data` went up through the server, and a `train` taken by runner h2."""
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    job = server.take(h1, "h1")
    store = job_store(server, h1, "h1", job["job_id"])
    manifest = save_tree(store, make_folder(tmp_path / "data"))
    assert store.stats.uploaded == 3 and store.stats.uploaded_bytes == BIG + 6 + 20  # the empty file is no blob
    server.finish(h1, "h1", job["job_id"], [{"path": "data", "manifest": manifest.digest(), "files": 4,
                                             "size": manifest.size}])
    h2 = server.runner("h2")
    server.submit(WORKFLOWS, "train")
    train = server.take(h2, "h2")
    assert train["dependencies"][0]["manifests"] == {"data": manifest.digest()}
    return manifest, h1, h2, train


def test_a_runner_saves_and_mounts_an_artifact_through_the_server(server, tmp_path):
    manifest, _h1, h2, train = prepared(server, tmp_path)
    store = job_store(server, h2, "h2", train["job_id"])
    cache = BlobCache(tmp_path / "h2" / "blobs", limit=1 << 30)
    tree = tree_cache(store, manifest.digest(), tmp_path / "h2" / "trees", cache)
    assert verify_tree(manifest, tree) == []
    assert os.stat(tree / "sub" / "tool.sh").st_mode & 0o111  # executable bits travel
    assert not os.stat(tree / "small.txt").st_mode & 0o222  # read-only
    assert store.stats.downloaded == 3 and store.stats.downloaded_bytes == BIG + 6 + 20
    # the same dependency again, in a tree of its own (as after the tree was pruned): from the cache alone
    again = job_store(server, h2, "h2", train["job_id"])
    tree2 = tree_cache(again, manifest.digest(), tmp_path / "h2" / "trees-again", cache)
    assert verify_tree(manifest, tree2) == [] and again.stats.downloaded == 0
    # saving content the store has: nothing goes up but the manifest
    out = tmp_path / "out"
    out.mkdir()
    (out / "copy.bin").write_bytes((tmp_path / "data" / "big.bin").read_bytes())
    saver = job_store(server, h2, "h2", train["job_id"])
    save_tree(saver, out)
    assert saver.stats.uploaded == 0


def test_a_runner_token_moves_only_its_own_unfinished_jobs_artifacts(server, tmp_path):
    manifest, h1, h2, train = prepared(server, tmp_path)
    big = next(e.hash for e in manifest.entries if e.size == BIG)
    base = f"/api/runners/h2/jobs/{train['job_id']}"
    # its own job: the dependency's manifest and blobs, nothing else
    assert h2.get(f"{base}/manifests/{manifest.digest()}").status_code == 200
    assert h2.get(f"{base}/blobs/{big}", headers={"Range": "bytes=0-9"}).status_code == 206
    other = hash_bytes(b"not in the artifact")
    r = h2.get(f"{base}/blobs/{other}")
    assert r.status_code == 403 and "in no dependency of job" in r.text
    assert h2.get(f"{base}/manifests/{other}").status_code == 403
    assert h2.post(f"{base}/downloads", json={"hashes": [big, other]}).status_code == 403
    # prepare has finished: its runner may move nothing for it any more
    prepare_id = server.check(server.admin.get("/api/runs", params={"repo_id": "transfers"}))
    done = next(j["job_id"] for run in prepare_id for j in run["jobs"] if run["workflow"] == "prepare")
    r = h1.post(f"/api/runners/h1/jobs/{done}/uploads", json={"blobs": [{"hash": other, "size": 1}]})
    assert r.status_code == 403 and "runs no unfinished job" in r.text
    assert h1.get(f"/api/runners/h1/jobs/{done}/blobs/{big}").status_code == 403
    # another runner's job, under its own name
    r = h1.get(f"/api/runners/h1/jobs/{train['job_id']}/manifests/{manifest.digest()}")
    assert r.status_code == 403
    # a job without artifacts uploads nothing
    server.submit(WORKFLOWS, "plain")
    plain = server.take(h1, "h1")
    r = h1.put(f"/api/runners/h1/jobs/{plain['job_id']}/blobs/{other}", params={"size": 1}, content=b"x")
    assert r.status_code == 403 and "saves no artifacts" in r.text
    # a name in the path other than its own
    assert h1.get(f"{base}/manifests/{manifest.digest()}".replace("/h2/", "/h1/")).status_code == 403
    assert h2.get(f"/api/runners/h1/jobs/{plain['job_id']}/blobs/{big}").status_code == 403


def test_an_upload_goes_on_from_what_the_server_holds(server, tmp_path):
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    job = server.take(h1, "h1")
    base = f"/api/runners/h1/jobs/{job['job_id']}"
    data = os.urandom(5 << 20)
    h = hash_bytes(data)
    # a request whose body ends early: the server keeps what came
    r = h1.put(f"{base}/blobs/{h}", params={"offset": 0, "size": len(data)}, content=data[: 1 << 20])
    assert r.status_code == 409 and f"ended at {1 << 20} of {len(data)} bytes" in r.text
    # a connection cut mid-body: the server keeps what came
    cut_upload(server.url, h1.headers["authorization"], f"{base}/blobs/{h}?offset={1 << 20}&size={len(data)}",
               data[1 << 20:], send=2 << 20)
    plan = server.check(h1.post(f"{base}/uploads", json={"blobs": [{"hash": h, "size": len(data)}]}))["blobs"][0]
    assert plan == {**plan, "stored": False, "offset": 3 << 20}
    # from elsewhere than where it stands: refused, saying where
    r = h1.put(f"{base}/blobs/{h}", params={"offset": 1 << 20, "size": len(data)}, content=data[1 << 20:])
    assert r.status_code == 409 and f"holds {3 << 20} bytes" in r.text
    store = job_store(server, h1, "h1", job["job_id"])
    src = tmp_path / "blob"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        store.put_file(fd, h, len(data))
    finally:
        os.close(fd)
    assert store.stats.uploaded_bytes == len(data) - (3 << 20)  # only the rest went
    assert store.has(h)
    stored = server.home / "storage" / "blobs" / h[:2] / h
    assert stored.read_bytes() == data and stat.S_IMODE(stored.stat().st_mode) == 0o444
    assert not list((server.home / "storage" / "tmp").glob(f"{h}.upload"))


def test_an_upload_that_does_not_match_its_hash_is_dropped(server):
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    base = f"/api/runners/h1/jobs/{server.take(h1, 'h1')['job_id']}"
    h = hash_bytes(b"the real content")
    r = h1.put(f"{base}/blobs/{h}", params={"size": 9}, content=b"forged!!!")
    assert r.status_code == 400 and "hash to" in r.text
    plan = server.check(h1.post(f"{base}/uploads", json={"blobs": [{"hash": h, "size": 16}]}))["blobs"][0]
    assert plan["stored"] is False and plan["offset"] == 0
    r = h1.put(f"{base}/blobs/{h}", params={"size": 3}, content=b"longer")
    assert r.status_code == 400 and "more bytes than the 3 announced" in r.text
    r = h1.put(f"{base}/blobs/not-a-hash", params={"size": 1}, content=b"x")
    assert r.status_code == 400 and "is not a BLAKE3 hash" in r.text


def test_another_upload_of_the_same_blob_waits_for_the_first(server):
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    base = f"/api/runners/h1/jobs/{server.take(h1, 'h1')['job_id']}"
    data = os.urandom(1 << 20)
    h = hash_bytes(data)
    with open_upload(server.url, h1.headers["authorization"], f"{base}/blobs/{h}?offset=0&size={len(data)}",
                     data[:1000]):
        r = h1.put(f"{base}/blobs/{h}", params={"size": len(data)}, content=data)
        assert r.status_code == 409 and "another upload of blob" in r.text


def test_a_manifest_comes_after_its_blobs_and_as_it_is_named(server, tmp_path):
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    job = server.take(h1, "h1")
    base = f"/api/runners/h1/jobs/{job['job_id']}"
    m = Manifest.build([Entry(path="a.txt", kind="file", mode=0o644, size=3, hash=hash_bytes(b"abc"))])
    r = h1.put(f"{base}/manifests/{m.digest()}", content=m.canonical_json())
    assert r.status_code == 409 and "names 1 blob(s) the store lacks" in r.text
    r = h1.put(f"{base}/manifests/{hash_bytes(b'x')}", content=m.canonical_json())
    assert r.status_code == 400 and "corrupt" in r.text
    loose = m.canonical_json().replace(b"{", b"{ ", 1)
    r = h1.put(f"{base}/manifests/{hash_bytes(loose)}", content=loose)
    assert r.status_code == 400 and "not in canonical form" in r.text
    store = job_store(server, h1, "h1", job["job_id"])
    store.put_bytes(b"abc", hash_bytes(b"abc"))
    assert store.put_manifest(m) == m.digest()
    assert (server.home / "storage" / "manifests" / f"{m.digest()}.json").exists()


def test_a_download_goes_on_from_what_a_cut_left(server, tmp_path):
    manifest, _h1, h2, train = prepared(server, tmp_path)
    big = next(e.hash for e in manifest.entries if e.size == BIG)
    content = (tmp_path / "data" / "big.bin").read_bytes()
    dest = tmp_path / "dl" / big
    dest.parent.mkdir()
    part = dest.with_name(f".{big}.part")
    part.write_bytes(content[: 4 << 20])  # what a download cut at 4 MiB leaves
    store = job_store(server, h2, "h2", train["job_id"])
    store.fetch(big, dest)
    assert dest.read_bytes() == content and not part.exists()
    assert store.stats.downloaded_bytes == BIG - (4 << 20) and store.stats.resumed_bytes == 4 << 20
    # a leftover that is wrong: found out by the hash, fetched afresh
    dest2 = tmp_path / "dl" / "again"
    dest2.with_name(".again.part").write_bytes(b"\0" * (1 << 20))
    store2 = job_store(server, h2, "h2", train["job_id"])
    store2.fetch(big, dest2)
    assert dest2.read_bytes() == content and store2.stats.downloaded_bytes == BIG + BIG - (1 << 20)


def cut_upload(url: str, authorization: str, path: str, body: bytes, send: int) -> None:
    """Send a PUT whose headers promise all of `body`, send `send` bytes of it, then cut the connection."""
    with open_upload(url, authorization, path, body[:send]):
        pass


class open_upload:
    """A PUT in flight: headers promising `len(body)` more bytes than `sent` (a raw socket, held open)."""

    def __init__(self, url: str, authorization: str, path: str, sent: bytes, total: int | None = None):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)))
        size = int(path.rsplit("size=", 1)[1])
        offset = int(path.split("offset=", 1)[1].split("&")[0])
        head = (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n"
                f"Content-Length: {size - offset}\r\n\r\n").encode()
        self.sock.sendall(head + sent)

    def __enter__(self):
        import time

        time.sleep(0.5)  # the server has read what was sent
        return self

    def __exit__(self, *exc):
        import time

        self.sock.close()
        time.sleep(0.5)  # the server has noticed


def test_a_download_that_does_not_match_its_hash_is_refused(server, tmp_path):
    manifest, _h1, h2, train = prepared(server, tmp_path)
    big = next(e.hash for e in manifest.entries if e.size == BIG)
    stored = server.home / "storage" / "blobs" / big[:2] / big
    stored.chmod(0o644)
    with open(stored, "r+b") as f:  # the store's copy rots
        f.write(b"rot")
    store = job_store(server, h2, "h2", train["job_id"])
    with pytest.raises(IntegrityError, match=f"blob {big} is corrupt"):
        store.fetch(big, tmp_path / "got")
    assert not (tmp_path / "got").exists() and (tmp_path / ".got.part").stat().st_size == 0


def test_a_runner_fetches_nothing_its_job_does_not_depend_on(server, tmp_path):
    manifest, h1, _h2, _train = prepared(server, tmp_path)
    big = next(e.hash for e in manifest.entries if e.size == BIG)
    server.submit(WORKFLOWS, "plain")
    plain = server.take(h1, "h1")
    store = job_store(server, h1, "h1", plain["job_id"])
    with pytest.raises(Forbidden, match="is in no dependency of job"):
        store.fetch(big, tmp_path / "got")
    with pytest.raises(Forbidden, match="is not a dependency of job"):
        store.get_manifest(manifest.digest())
    with pytest.raises(Forbidden, match="saves no artifacts"):
        store.put_bytes(b"x", hash_bytes(b"x"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_runner_whose_disk_is_full_says_so(server, tmp_path):
    manifest, _h1, h2, train = prepared(server, tmp_path)
    big = next(e.hash for e in manifest.entries if e.size == BIG)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(DstackError, match="cannot write a downloaded blob: No space left on device"):
            job_store(server, h2, "h2", train["job_id"]).fetch(big, small / "got")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_store_that_is_a_folder_takes_no_uploads_in_parts(server):
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    base = f"/api/runners/h1/jobs/{server.take(h1, 'h1')['job_id']}"
    r = h1.post(f"{base}/blobs/{hash_bytes(b'x')}/complete", json={"upload_id": "u", "size": 1})
    assert r.status_code == 409 and "takes no uploads in parts" in r.text


def test_a_large_file_goes_up_while_it_is_hashed_and_stops_when_the_store_has_it(server, tmp_path):
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    job = server.take(h1, "h1")
    folder = tmp_path / "large"
    folder.mkdir()
    data = os.urandom(70 << 20)  # over SEND_WHILE_HASHING
    (folder / "weights.bin").write_bytes(data)
    store = job_store(server, h1, "h1", job["job_id"])
    save_tree(store, folder)
    h = hash_bytes(data)
    assert store.stats.uploaded == 1 and store.stats.uploaded_bytes == len(data)
    assert (server.home / "storage" / "blobs" / h[:2] / h).read_bytes() == data
    again = job_store(server, h1, "h1", job["job_id"])
    save_tree(again, folder)  # the hash shows the store has it: the upload stops
    assert again.stats.uploaded == 0


def test_an_upload_sent_while_hashed_goes_on_from_what_the_server_holds(server):
    h1 = server.runner("h1")
    server.submit(WORKFLOWS, "prepare")
    base = f"/api/runners/h1/jobs/{server.take(h1, 'h1')['job_id']}"
    data = os.urandom(3 << 20)
    upload = "ab" * 16
    assert server.check(h1.get(f"{base}/staged/{upload}")) == {"offset": 0}
    cut_upload(server.url, h1.headers["authorization"], f"{base}/staged/{upload}?offset=0&size={len(data)}", data,
               send=1 << 20)
    held = server.check(h1.get(f"{base}/staged/{upload}"))["offset"]
    assert held == 1 << 20
    r = h1.put(f"{base}/staged/{upload}", params={"offset": held, "size": len(data)}, content=data[held:])
    assert server.check(r) == {"stored": True, "hash": hash_bytes(data)}
    r = h1.put(f"{base}/staged/not-an-id", params={"size": 1}, content=b"x")
    assert r.status_code == 400 and "is not an upload id" in r.text
