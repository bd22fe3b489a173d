"""A blob's bytes over plain HTTP/1.1 (the standard library's http.client): a download is read into one buffer
and written from it, an upload is sent from the file by sendfile(2), so that Python touches each byte once at
most (httpx parses a large body several times slower: bench/artifact_transfer.py). One keep-alive connection
per thread and address. The policy (what to fetch where, resuming, retrying) is dstack.runner.transfer's."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from blake3 import blake3

from dstack.core.errors import DstackError
from dstack.runner.client import raise_for

PIECE = 128 << 10  # bytes per read, write and hash: they stay in the CPU cache between the three (1 MiB: 2x slower)
TIMEOUT = 60.0  # seconds without a byte before a transfer counts as cut
CUT = (OSError, http.client.HTTPException)  # a connection that broke: go on from where it stopped


class Unreachable(DstackError):
    """No connection can be made to the address (refused, no route, no such host)."""


class Restart(DstackError):
    """The download starts over from byte 0."""


class Refused(DstackError):
    """The other end answered with an error status (`status`), whose body is `body`."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]):
        super().__init__(f"answered {status}: {body[:200].decode(errors='replace')}")
        self.status, self.body, self.headers = status, body, headers

    @property
    def kind(self) -> str | None:
        """The kind of error the server's JSON says (`integrity`: the bytes sent do not hash to their name)."""
        try:
            return json.loads(self.body)["error"]["kind"]
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def detail(self) -> str:
        """What the other end said: the server's message, or S3's (its XML's <Message>), or the body's start."""
        try:
            return json.loads(self.body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        text = self.body[:2000].decode(errors="replace")
        found = re.search(r"<Message>(.*?)</Message>", text, re.S)
        return (found.group(1) if found else text[:200]).strip() or f"status {self.status}"

    def as_ours(self) -> DstackError:
        """The server's own error (its JSON), as dstack.runner.client raises it (ServerTrouble: try again)."""
        try:
            raise_for(httpx.Response(self.status, content=self.body, headers=self.headers))
        except DstackError as e:
            return e
        return self  # a redirection: not the server's way


class Connections(threading.local):
    """This thread's connections, by scheme and address."""

    def __init__(self) -> None:
        self.conns: dict[tuple[str, str], http.client.HTTPConnection] = {}

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conn = self.conns.get((scheme, netloc))
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = cls(netloc, timeout=TIMEOUT)
            self.conns[(scheme, netloc)] = conn
        if conn.sock is None:
            try:
                conn.connect()
            except (ConnectionRefusedError, socket.gaierror, TimeoutError, OSError) as e:
                self.conns.pop((scheme, netloc), None)
                raise Unreachable(f"cannot connect to {netloc}: {e}") from None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def request(self, method: str, url: str, headers: dict[str, str],
                send: Callable[[socket.socket], None] | None = None) -> http.client.HTTPResponse:
        """The answer's status and headers (its body still to read); CUT errors when the connection broke."""
        u = urlsplit(url)
        key = (u.scheme, u.netloc)
        conn = self._conn(*key)
        try:
            conn.putrequest(method, u.path + (f"?{u.query}" if u.query else ""), skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            if send is not None:
                send(conn.sock)
            return conn.getresponse()
        except BaseException:  # a request broken off leaves the connection unusable
            self.drop(key)
            raise

    def abandon(self, url: str, r: http.client.HTTPResponse) -> None:
        """Leave an answer unread: its connection goes too (the rest of the body would come before the next)."""
        r.close()
        u = urlsplit(url)
        self.drop((u.scheme, u.netloc))

    def drop(self, key: tuple[str, str]) -> None:
        conn = self.conns.pop(key, None)
        if conn is not None:
            conn.close()


def _refused(r: http.client.HTTPResponse) -> Refused:
    return Refused(r.status, r.read(), dict(r.getheaders()))


def get_into(conns: Connections, url: str, headers: dict[str, str], fd: int, have: int,
             hasher: blake3) -> tuple[int, int]:
    """GET `url` from byte `have` on into `fd` (which holds `have` bytes, hashed into `hasher` already), writing
    and hashing what comes. Returns (bytes held now, the blob's size). Refused for an error status; CUT errors
    when the connection breaks (what came is written and hashed: go on from there); Restart when the answer
    would send it all again, or says the blob has another size than the bytes held (the file is emptied: start
    over)."""
    r = conns.request("GET", url, {**headers, **({"Range": f"bytes={have}-"} if have else {})})
    if r.status == 416 and have:  # nothing after `have`: it was all there (the hash says whether it was right)
        r.read()
        size = (r.getheader("Content-Range") or "").rpartition("/")[2]
        if size.isdigit() and int(size) != have:  # more bytes held than the blob has
            os.ftruncate(fd, 0)
            raise Restart(f"{have} bytes were kept of a blob of {size}")
        return have, have
    if r.status >= 400:
        raise _refused(r)
    if r.status == 200:
        if have:  # the whole blob would come (a proxy or store that ignores Range): start over, from an empty
            conns.abandon(url, r)  # file and a fresh hash
            os.ftruncate(fd, 0)
            raise Restart("the answer ignored the Range request")
        total = int(r.getheader("Content-Length") or -1)
    else:
        text = r.getheader("Content-Range") or ""
        start, _, size = text.removeprefix("bytes ").partition("/")
        if not size.isdigit() or start.split("-")[0] != str(have):
            conns.abandon(url, r)
            raise DstackError(f"a download answered with Content-Range '{text}', not from byte {have}")
        total = int(size)
    if total < 0:
        conns.abandon(url, r)
        raise DstackError("a download answered without its length")
    buf = bytearray(PIECE)
    view = memoryview(buf)
    try:
        while have < total:
            n = r.readinto(view[: min(PIECE, total - have)])
            if not n:
                raise http.client.IncompleteRead(b"", total - have)
            piece = view[:n]
            try:
                _pwrite_all(fd, piece, have)
            except OSError as e:  # this machine's trouble, not the connection's
                raise DstackError(f"cannot write a downloaded blob: {e.strerror}") from None
            hasher.update(piece)
            have += n
    finally:
        if have < total:
            conns.abandon(url, r)
    return have, total


class Stopped(DstackError):
    """The caller asked that the upload stop (its connection is dropped)."""


def put_from(conns: Connections, url: str, headers: dict[str, str], source: int | memoryview, start: int,
             end: int, stop: threading.Event | None = None) -> bytes:
    """PUT bytes [start, end) of `source` (an open file, sent by sendfile, or bytes in memory); the answer's
    body. Refused for an error status; CUT errors when the connection breaks; Stopped once `stop` is set."""

    def send(sock: socket.socket) -> None:
        if isinstance(source, int):  # socket.sendfile: sendfile(2), waiting on a full socket as a send does
            pos = start
            while pos < end:
                if stop is not None and stop.is_set():
                    raise Stopped("the upload was stopped")
                n = min(end - pos, 16 << 20)
                if sock.sendfile(_Fd(source), pos, n) != n:
                    raise DstackError("a file shrank while it was uploaded")
                pos += n
        else:
            sock.sendall(source[start:end])

    r = conns.request("PUT", url, {**headers, "Content-Length": str(end - start)}, send)
    if r.status >= 300:
        raise _refused(r)
    return r.read()


class _Fd:
    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
