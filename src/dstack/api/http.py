"""A small HTTP/1.1 client on the standard library: the CLI starts in a fraction of the time that
importing a full HTTP client takes, and talks to one server over one kept-alive connection."""

from __future__ import annotations

import http.client
import json as jsonlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit


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
    """The server could not be reached or the connection broke."""


class HttpClient:
    def __init__(self, base_url: str, headers: dict[str, str], timeout: float = 60.0):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https"):
            raise TransportError(f"unsupported URL {base_url!r}: use http:// or https://")
        self._https = u.scheme == "https"
        self._host, self._port = u.hostname or "127.0.0.1", u.port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self._headers = headers
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def request(self, method: str, path: str, params: dict | None = None, json: Any = None,
                content: bytes | None = None, timeout: float | None = None) -> Response:
        url = self._prefix + path
        if params:
            url += "?" + urlencode({k: _param(v) for k, v in params.items() if v is not None})
        headers = dict(self._headers)
        body = content
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection(timeout or self._timeout)
            try:
                conn.request(method, url, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt == 2:
                    raise TransportError(str(e)) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise TransportError(str(e) or type(e).__name__) from None
            except BaseException:  # e.g. Ctrl-C mid-request: the connection is in an unknown state
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _param(v: Any) -> Any:
    return str(v).lower() if isinstance(v, bool) else v
