"""A small HTTP/1.1 client on the standard library: the CLI starts in a fraction of the time that
importing a full HTTP client takes, and talks to its server over one kept-alive connection."""

from __future__ import annotations

import json as jsonlib
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit


@dataclass
class Response:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class TransportError(Exception):
    """The server could not be reached or the connection broke. `refused`: the connection was refused, so the
    request was never sent (sending it again cannot do it twice)."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class HttpClient:
    """HTTP/1.1 with keep-alive. Plain http is spoken directly over a socket (importing http.client
    costs ~40 ms of start-up, a tenth of a quick command); https goes through http.client."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float = 60.0):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https"):
            raise TransportError(f"unsupported URL {base_url!r}: use http:// or https://")
        self._https = u.scheme == "https"
        self._host, self._port = u.hostname or "127.0.0.1", u.port or (443 if self._https else 80)
        # an ASCII host as bytes: a str one makes the socket module load the IDNA codec (~3 ms of start-up)
        self._address = (self._host.encode() if self._host.isascii() else self._host, self._port)
        self._prefix = u.path.rstrip("/")
        self._headers = headers
        self._timeout = timeout
        self._conn = None  # http.client connection (https) or (socket, reader) (http)

    def request(self, method: str, path: str, params: dict | None = None, json: Any = None,
                content: bytes | None = None, timeout: float | None = None) -> Response:
        # percent-encoded, an argument that was not UTF-8 as its bytes: the server refuses it in words
        url = self._prefix + quote(path, safe="/:@!$&'()*+,;=-._~", errors="surrogateescape")
        if params:
            url += "?" + urlencode({k: _param(v) for k, v in params.items() if v is not None},
                                   errors="surrogateescape")
        headers = dict(self._headers)
        body = content
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        send = self._send_https if self._https else self._send
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: reconnect once
            reused = self._conn is not None
            try:
                return send(method, url, headers, body, timeout or self._timeout)
            except _Stale:
                self.close()
                if attempt == 2 or not reused:
                    raise TransportError("the server closed the connection") from None
            except OSError as e:
                self.close()
                raise TransportError(str(e) or type(e).__name__,
                                     refused=isinstance(e, ConnectionRefusedError) and not reused) from None
            except BaseException:  # e.g. Ctrl-C mid-request: the connection is in an unknown state
                self.close()
                raise
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, headers: dict, body: bytes | None, timeout: float) -> Response:
        if self._conn is None:
            sock = socket.create_connection(self._address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = (sock, sock.makefile("rb"))
        sock, reader = self._conn
        sock.settimeout(timeout)
        lines = [f"{method} {url} HTTP/1.1", f"Host: {self._host}:{self._port}",
                 f"Content-Length: {len(body or b'')}", *(f"{k}: {v}" for k, v in headers.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            if body and len(body) > _JOIN_LIMIT:  # a code blob: sent as it is, never copied behind the headers
                sock.sendall(head)
                sock.sendall(body)
            else:  # one segment
                sock.sendall(head + (body or b""))
            status_line = reader.readline(65537)
        except (BrokenPipeError, ConnectionResetError):
            raise _Stale() from None
        if not status_line:
            raise _Stale()
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise TransportError(f"not an HTTP response: {status_line[:80]!r}")
        status = int(parts[1])
        resp_headers: dict[str, str] = {}
        while True:
            line = reader.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            resp_headers[k.strip().lower()] = v.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            data = b""
        elif resp_headers.get("transfer-encoding", "").lower() == "chunked":
            data = _read_chunked(reader)
        elif "content-length" in resp_headers:
            data = _read_exactly(reader, int(resp_headers["content-length"]))
        else:
            data = reader.read()
            resp_headers["connection"] = "close"
        if resp_headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, resp_headers, data)

    def download(self, path: str, out, offset: int = 0, on_bytes=None, timeout: float | None = None) -> int:
        """GET `path` into the binary file `out`, from byte `offset` (a Range request, for resuming),
        in chunks; returns the HTTP status. Plain http only (https: one request, in memory)."""
        headers = dict(self._headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        if self._https:
            r = self._send_https("GET", self._prefix + path, headers, None, timeout or self._timeout)
            if r.status_code < 300:
                out.write(r.content)
                if on_bytes:
                    on_bytes(len(r.content))
            return r.status_code
        self.close()  # a fresh connection: the body is read as it comes, then the connection is dropped
        try:
            sock = socket.create_connection(self._address, timeout=timeout or self._timeout)
            with sock, sock.makefile("rb") as reader:
                lines = [f"GET {self._prefix + path} HTTP/1.1", f"Host: {self._host}:{self._port}",
                         "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
                sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                status = int(reader.readline(65537).decode("latin-1").split(" ", 2)[1])
                while reader.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                if status >= 300:
                    return status
                while chunk := reader.read(1 << 20):
                    out.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
                return status
        except (OSError, ValueError, IndexError) as e:
            raise TransportError(str(e) or type(e).__name__) from None

    def _send_https(self, method: str, url: str, headers: dict, body: bytes | None, timeout: float) -> Response:
        import http.client

        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        conn = self._conn
        conn.timeout = timeout
        try:
            conn.request(method, url, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            raise _Stale() from None
        except http.client.HTTPException as e:
            raise TransportError(str(e) or type(e).__name__) from None
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if isinstance(conn, tuple):
            conn[1].close()
            conn[0].close()
        else:
            conn.close()


_JOIN_LIMIT = 1 << 16  # a body up to this size travels in one send with its headers


class _Stale(Exception):
    """The kept-alive connection was closed by the server before this request."""


def _read_exactly(reader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise TransportError(f"the server sent {len(data)} of {n} bytes")
    return data


def _read_chunked(reader) -> bytes:
    out = bytearray()
    while True:
        size = int(reader.readline(65537).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(out)
        out += _read_exactly(reader, size)
        reader.readline(65537)


def _param(v: Any) -> Any:
    return str(v).lower() if isinstance(v, bool) else v
