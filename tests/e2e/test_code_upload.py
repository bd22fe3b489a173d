"""Code blobs pass through the server in pieces: an upload streams to disk and is stored only under its own
sha256, a download streams from the file, and the server's memory stays flat whatever the blob's size."""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import time
from urllib.parse import urlsplit

SIZE = 64 << 20
PIECE = 1 << 20
MEMORY_SLACK = 32 << 20  # what the server may grow by while it takes and gives a 64 MiB blob


def _pieces(seed: int):
    rnd = random.Random(seed)
    for _ in range(SIZE // PIECE):
        yield rnd.randbytes(PIECE)


def _digest(seed: int) -> str:
    h = hashlib.sha256()
    for p in _pieces(seed):
        h.update(p)
    return h.hexdigest()


def _wait(condition, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not (ok := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return ok


class _Server:
    def __init__(self, dstack, cwd):
        dstack("status", cwd=cwd, check=True)  # the local server runs
        info = json.loads((dstack.home / "server" / "server.json").read_text())
        self.pid, self.code = info["pid"], dstack.home / "server" / "code"
        u = urlsplit(info["url"])
        self.address = (u.hostname, u.port)
        self.headers = {"Authorization": f"Bearer {(dstack.home / 'server' / 'token').read_text().strip()}"}

    def request(self, method: str, path: str, body=None, length: int = 0) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(*self.address, timeout=120)
        headers = {**self.headers, **({"Content-Length": str(length)} if body is not None else {})}
        conn.request(method, path, body=body, headers=headers)  # an iterable body is sent piece by piece
        return conn.getresponse()

    def status(self, field: str) -> int:
        """VmRSS or VmHWM (the peak since the last reset), in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def reset_peak(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS


def test_a_large_code_blob_streams_to_disk_and_back_in_bounded_memory(dstack, project):
    server = _Server(dstack, project("workflows: []\n"))
    digest = _digest(1)
    server.reset_peak()
    idle = server.status("VmRSS")

    r = server.request("PUT", f"/api/code/{digest}", _pieces(1), SIZE)
    assert r.status == 200, r.read()
    stored = server.code / digest
    assert stored.stat().st_size == SIZE
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest

    r = server.request("GET", f"/api/code/{digest}")
    assert r.status == 200 and int(r.headers["content-length"]) == SIZE
    h = hashlib.sha256()
    while piece := r.read(PIECE):
        h.update(piece)
    assert h.hexdigest() == digest

    grew = server.status("VmHWM") - idle
    assert grew < MEMORY_SLACK, f"the server grew by {grew >> 20} MiB for a {SIZE >> 20} MiB blob"
    assert not list(server.code.glob(".tmp-*"))


def test_a_code_blob_under_a_wrong_digest_is_refused_and_nothing_is_stored(dstack, project):
    server = _Server(dstack, project("workflows: []\n"))
    wrong = hashlib.sha256(b"something else").hexdigest()
    before = set(server.code.iterdir())

    r = server.request("PUT", f"/api/code/{wrong}", _pieces(2), SIZE)
    assert r.status == 400
    assert "does not match its hash" in json.loads(r.read())["error"]["message"]
    assert server.request("HEAD", f"/api/code/{wrong}").status == 404
    assert set(server.code.iterdir()) == before  # neither the blob nor a temporary file is left


def test_an_upload_broken_off_leaves_nothing_behind(dstack, project):
    server = _Server(dstack, project("workflows: []\n"))
    digest = _digest(3)
    before = set(server.code.iterdir())
    with socket.create_connection(server.address) as sock:
        head = [f"PUT /api/code/{digest} HTTP/1.1", f"Host: {server.address[0]}", f"Content-Length: {SIZE}",
                *(f"{k}: {v}" for k, v in server.headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.sendall(next(_pieces(3)) * 8)  # 8 of its 64 MiB, then the client is gone
        assert _wait(lambda: list(server.code.glob(".tmp-*")))  # the upload is under way
    assert _wait(lambda: set(server.code.iterdir()) == before)
    assert server.request("HEAD", f"/api/code/{digest}").status == 404
