"""What a runner's transfers do when the way to the store misbehaves: a real server (its store a folder, or S3 on
a real moto server), and between the runner and it a real HTTP proxy on loopback (`Proxy`) that ignores Range,
alters bytes, or keeps an S3 clock by which presigned URLs expire, as S3 does. Nothing of ours is mocked."""

# ruff: noqa: F811  (pytest fixtures imported from s3_server and used as arguments)
from __future__ import annotations

import calendar
import http.client
import logging
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from s3_server import moto_s3, s3_config  # noqa: F401  (fixtures)
from test_store_http import BIG, WORKFLOWS, prepared
from tests.dstack_server import Server

from dstack.core.errors import DstackError
from dstack.runner.client import ServerClient
from dstack.runner.transfer import ATTEMPTS, REFUSALS, SEND_WHILE_HASHING, JobStore, Transfers
from dstack.storage.cache import BlobCache
from dstack.storage.hashing import IntegrityError, hash_bytes
from dstack.storage.s3 import PRESIGN_EXPIRES

# ---- the proxy ----


class Proxy(ThreadingHTTPServer):
    """A real HTTP proxy in front of `upstream` (a dstack server, or the S3 endpoint whose URLs the server signs).
    It misbehaves as told: `ignore_range` (answers a Range request with the whole body, 200), `alter[method]`
    (how many more bodies of blob transfers to alter, -1: all; PUT: what is sent, GET: what comes back), and S3's
    clock (`s3_clock`), by which it refuses expired presigned URLs as S3 does. `seen`: (method, path, Range?,
    status) of each request."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = urlsplit(upstream).netloc
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, bool, int]] = []
        self.ignore_range = False
        self.alter: dict[str, int] = {}
        self._jump: float | None = None
        self._ahead = 0.0
        self._frozen: float | None = None
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def s3_clock(self, *, jump: float | None = None, ahead: float = 0.0) -> None:
        """S3's clock from now on: `jump`: it jumps that far ahead at the next presigned request (and stands
        there); `ahead`: it runs that far ahead of this machine's (and the server's, which signs the URLs)."""
        with self.lock:
            self._jump, self._ahead, self._frozen = jump, ahead, None

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up on an answer (as one that drops a 200 to its Range request does)

    def expired(self, query: dict[str, list[str]]) -> str | None:
        """S3's answer to a presigned URL past its time (None: in time, or not presigned)."""
        if "X-Amz-Date" not in query:
            return None
        with self.lock:
            if self._jump is not None and self._frozen is None:
                self._frozen = time.time() + self._jump
            now = self._frozen if self._frozen is not None else time.time() + self._ahead
        signed = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
        expires = signed + int(query["X-Amz-Expires"][0])
        if now <= expires:
            return None
        stamp = "%Y-%m-%dT%H:%M:%SZ"
        return ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Request has "
                f"expired</Message><X-Amz-Expires>{query['X-Amz-Expires'][0]}</X-Amz-Expires><Expires>"
                f"{time.strftime(stamp, time.gmtime(expires))}</Expires><ServerTime>"
                f"{time.strftime(stamp, time.gmtime(now))}</ServerTime></Error>")

    def take(self, method: str, path: str, body: bytes) -> bool:
        """Whether to alter this body (one of a blob's, not empty) of a blob transfer."""
        if not body or not ("/blobs/" in path or "/staged/" in path):
            return False
        with self.lock:
            left = self.alter.get(method, 0)
            if left:
                self.alter[method] = left - 1
            return left != 0

    def blob_requests(self, method: str, h: str) -> list[tuple[bool, int]]:
        """(Range?, status) of the requests for blob `h` with that method, in order."""
        return [(ranged, status) for m, path, ranged, status in self.seen if m == method and f"/blobs/{h}" in path]


def altered(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        proxy, body = self.server, self._body()
        u = urlsplit(self.path)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("connection", "transfer-encoding", "expect", "content-length")}
        ranged = any(k.lower() == "range" for k in headers)
        if proxy.ignore_range:
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        refusal = proxy.expired(parse_qs(u.query))
        if refusal is not None:
            self._answer(403, [("Content-Type", "application/xml")], refusal.encode(), ranged)
            return
        if proxy.take(self.command, u.path, body):
            body = altered(body)
        conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers={**headers, "Content-Length": str(len(body))})
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        if self.command == "GET" and r.status in (200, 206) and proxy.take("GET", u.path, data):
            data = altered(data)
        self._answer(r.status, r.getheaders(), data, ranged)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while n := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(n)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(data)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, ranged: bool) -> None:
        with self.server.lock:
            self.server.seen.append((self.command, urlsplit(self.path).path, ranged, status))
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("connection", "transfer-encoding", "keep-alive", "content-length", "date", "server"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        else:
            self.send_header("Content-Length", dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


# ---- the two ways to the store ----


@dataclass
class Route:
    """A server, and the proxy that a runner's blobs pass: in front of the server (its store a folder), or in
    front of S3 (the URLs the server signs name the proxy)."""

    server: Server
    proxy: Proxy
    url: str  # where a runner reaches the server
    presigned: bool

    def store(self, http, name: str, job_id: str) -> JobStore:
        token = http.headers["authorization"].split()[1]
        return Transfers(ServerClient(self.url, token), self.presigned).for_job(name, job_id)


@pytest.fixture
def through_server(tmp_path):
    server = Server(tmp_path / "server-home")
    proxy = Proxy(server.url)
    yield Route(server, proxy, proxy.url, presigned=False)
    proxy.close()
    server.stop()


@pytest.fixture
def through_s3(tmp_path, s3_config):
    proxy = Proxy(s3_config["endpoint_url"])
    server = Server(tmp_path / "server-home", env={"DSTACK_STORE_URL": (
        f"s3://{s3_config['bucket']}/{s3_config['prefix']}?region=us-east-1&endpoint_url={proxy.url}")})
    yield Route(server, proxy, server.url, presigned=True)
    proxy.close()
    server.stop()


@pytest.fixture(params=["server", "s3"])
def route(request) -> Route:
    return request.getfixturevalue(f"through_{request.param}")


def dependency(route: Route, tmp_path: Path) -> tuple[JobStore, str, bytes]:
    """A store for `train` (on h2), which depends on `prepare`'s artifact; its large blob and that blob's bytes."""
    manifest, _h1, h2, train = prepared(route.server, tmp_path)
    big = next(e.hash for e in manifest.entries if e.size == BIG)
    store = route.store(h2, "h2", train["job_id"])
    store.get_manifest(manifest.digest())  # as a tree build does first: its blobs' URLs are asked for together
    return store, big, (tmp_path / "data" / "big.bin").read_bytes()


def saving(route: Route) -> JobStore:
    """A store for a job (of h1) that saves artifacts."""
    h1 = route.server.runner("h1")
    route.server.submit(WORKFLOWS, "prepare")
    return route.store(h1, "h1", route.server.take(h1, "h1")["job_id"])


def stored_blobs(server: Server) -> set[str]:
    return {p.name for p in (server.home / "storage" / "blobs").glob("*/*")}


def leftovers(server: Server) -> list[str]:
    return sorted(p.name for p in (server.home / "storage" / "tmp").iterdir())


# ---- 1. expired presigned URLs ----


def test_a_download_by_an_expired_url_asks_for_a_fresh_one(through_s3, tmp_path):
    store, big, content = dependency(through_s3, tmp_path)
    through_s3.proxy.s3_clock(jump=PRESIGN_EXPIRES)  # an hour passes at S3 once the first URL is used
    cache = BlobCache(tmp_path / "cache")
    assert cache.ensure(store, big).read_bytes() == content
    gets = through_s3.proxy.blob_requests("GET", big)
    assert gets[0] == (False, 403) and gets[-1] == (False, 200) and len(gets) <= REFUSALS
    assert store.stats.downloaded == 1 and store.stats.downloaded_bytes == BIG


def test_a_store_that_refuses_even_fresh_urls_says_so(through_s3, tmp_path):
    store, big, _content = dependency(through_s3, tmp_path)
    through_s3.proxy.s3_clock(ahead=10 * PRESIGN_EXPIRES)  # S3's clock is hours ahead of the server's
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(DstackError, match=f"refused the presigned URLs of blob {big[:12]} {REFUSALS} times, fresh "
                                          "ones too \\(403: Request has expired\\)") as e:
        cache.ensure(store, big)
    assert "clock" in e.value.hint
    assert through_s3.proxy.blob_requests("GET", big) == [(False, 403)] * REFUSALS
    assert not cache.path(big).exists() and cache.usage() == 0


def test_an_upload_by_an_expired_url_asks_for_a_fresh_one(through_s3, s3_config, tmp_path):
    store = saving(through_s3)
    data = os.urandom(1 << 20)
    h = hash_bytes(data)
    through_s3.proxy.s3_clock(jump=PRESIGN_EXPIRES)
    store.put_bytes(data, h)
    puts = through_s3.proxy.blob_requests("PUT", h)
    assert puts[0] == (False, 403) and puts[-1] == (False, 200) and len(puts) <= REFUSALS
    s3 = boto3.client("s3", endpoint_url=s3_config["endpoint_url"], region_name="us-east-1")
    got = s3.get_object(Bucket=s3_config["bucket"], Key=f"{s3_config['prefix']}/blobs/{h}")["Body"].read()
    assert got == data
    # S3's clock far ahead: no URL will do, and the upload says why
    other = os.urandom(1000)
    through_s3.proxy.s3_clock(ahead=10 * PRESIGN_EXPIRES)
    with pytest.raises(DstackError, match=f"refused the presigned URLs for blob {hash_bytes(other)[:12]}"):
        store.put_bytes(other, hash_bytes(other))
    assert len(through_s3.proxy.blob_requests("PUT", hash_bytes(other))) == REFUSALS


# ---- 2. a resumed download answered with the whole blob ----


def test_a_resumed_download_whose_range_is_ignored_starts_over(route, tmp_path, caplog):
    store, big, content = dependency(route, tmp_path)
    dest = tmp_path / "dl" / big
    dest.parent.mkdir()
    part = dest.with_name(f".{big}.part")
    part.write_bytes(content[: 4 << 20])  # what a download cut at 4 MiB leaves
    route.proxy.ignore_range = True
    with caplog.at_level(logging.WARNING, logger="dstack.runner"):
        store.fetch(big, dest)
    assert dest.read_bytes() == content and not part.exists()
    assert store.stats.resumed_bytes == 0 and store.stats.downloaded_bytes == BIG
    assert route.proxy.blob_requests("GET", big) == [(True, 200), (False, 200)]
    assert not [r.message for r in caplog.records if "broke off" in r.message]  # no request on a spoilt connection


def test_a_download_held_whole_before_a_cut_is_not_fetched_again(route, tmp_path):
    store, big, content = dependency(route, tmp_path)
    dest = tmp_path / "dl" / big
    dest.parent.mkdir()
    dest.with_name(f".{big}.part").write_bytes(content)  # a runner killed between the last byte and the rename
    store.fetch(big, dest)
    assert dest.read_bytes() == content
    assert store.stats.downloaded_bytes == 0 and store.stats.resumed_bytes == BIG
    longer = tmp_path / "dl" / "longer"
    longer.with_name(".longer.part").write_bytes(content + b"more")  # more than the blob: fetched afresh
    store.fetch(big, longer)
    assert longer.read_bytes() == content


# ---- 3. uploads whose bytes do not hash to their name ----


def test_an_upload_altered_on_the_way_is_refused_and_sent_again(through_server, tmp_path):
    server, proxy = through_server.server, through_server.proxy
    store = saving(through_server)
    data = os.urandom(3 << 20)
    h = hash_bytes(data)
    src = tmp_path / "blob"
    src.write_bytes(data)
    proxy.alter["PUT"] = 1
    fd = os.open(src, os.O_RDONLY)
    try:
        store.put_file(fd, h, len(data))
    finally:
        os.close(fd)
    assert [status for _r, status in proxy.blob_requests("PUT", h)] == [400, 200]
    assert (server.home / "storage" / "blobs" / h[:2] / h).read_bytes() == data
    assert store.stats.uploaded == 1 and store.stats.uploaded_bytes == 2 * len(data)
    # altered every time: refused every time, said so, and nothing of it kept
    other = os.urandom(1 << 20)
    proxy.alter["PUT"] = -1
    with pytest.raises(IntegrityError, match=f"the server refused blob {hash_bytes(other)[:12]} {ATTEMPTS} times"):
        store.put_bytes(other, hash_bytes(other))
    assert [status for _r, status in proxy.blob_requests("PUT", hash_bytes(other))] == [400] * ATTEMPTS
    assert stored_blobs(server) == {h} and leftovers(server) == []


def test_a_large_file_altered_on_the_way_is_refused_and_sent_again(through_server, tmp_path):
    server, proxy = through_server.server, through_server.proxy
    store = saving(through_server)
    data = os.urandom(SEND_WHILE_HASHING + 1000)  # sent while it is hashed, before the server knows its name
    src = tmp_path / "large"
    src.write_bytes(data)
    proxy.alter["PUT"] = 1
    fd = os.open(src, os.O_RDONLY)
    try:
        assert store.ingest(fd, len(data)) == hash_bytes(data)
    finally:
        os.close(fd)
    assert stored_blobs(server) == {hash_bytes(data)}  # not the altered bytes' blob
    assert (server.home / "storage" / "blobs" / hash_bytes(data)[:2] / hash_bytes(data)).read_bytes() == data
    assert leftovers(server) == []
    # altered every time
    data = data[::-1]
    src.write_bytes(data)
    proxy.alter["PUT"] = -1
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(IntegrityError, match=f"refused a file of {len(data)} bytes {ATTEMPTS} times"):
            store.ingest(fd, len(data))
    finally:
        os.close(fd)
    assert len(stored_blobs(server)) == 1 and leftovers(server) == []


# ---- 4. downloads whose bytes do not hash to their name ----


def test_a_download_altered_on_the_way_is_fetched_again_then_refused(route, tmp_path):
    store, big, content = dependency(route, tmp_path)
    route.proxy.alter["GET"] = 1
    cache = BlobCache(tmp_path / "cache")
    assert cache.ensure(store, big).read_bytes() == content
    assert [status for _r, status in route.proxy.blob_requests("GET", big)] == [200, 200]
    # altered every time: refused, and nothing of it in the cache
    route.proxy.alter["GET"] = -1
    other = BlobCache(tmp_path / "other-cache")
    with pytest.raises(IntegrityError, match=f"blob {big} is corrupt: it came {ATTEMPTS} times"):
        other.ensure(store, big)
    assert len(route.proxy.blob_requests("GET", big)) == 2 + ATTEMPTS
    assert not other.path(big).exists() and other.usage() == 0
    assert (tmp_path / "other-cache" / big[:2] / f".{big}.part").stat().st_size == 0
