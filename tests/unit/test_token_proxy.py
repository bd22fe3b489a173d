"""providers/token_proxy.py, as a job runs it: the app (here Python's http.server) started in the background by a
shell that then becomes the proxy; requests pass only with the token (in the URL, then the port's cookie, which
holds no token), malformed bodies are refused, and the proxy ends with the app."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dstack.providers.token_proxy as token_proxy

TOKEN = "5ecret" * 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proxied(tmp_path):
    (tmp_path / "index.html").write_text("the app\n")
    listen, app = _free_port(), _free_port()
    script = (f"{sys.executable} -m http.server {app} --bind 127.0.0.1 >/dev/null 2>&1 & "
              f"exec {sys.executable} {token_proxy.__file__} {listen} {app} $! App")
    proxy = subprocess.Popen(["sh", "-c", script], cwd=tmp_path, env={**os.environ, "DSTACK_APP_TOKEN": TOKEN},
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    ready = proxy.stdout.readline() + proxy.stdout.readline()
    assert "App is ready: http://" in ready and f":{listen}/?token={TOKEN}" in ready, ready
    yield listen, proxy
    if proxy.poll() is None:
        os.killpg(proxy.pid, signal.SIGKILL)
    proxy.wait()


def _get(port: int, path: str, headers: dict | None = None, method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, headers=headers or {})
    return conn.getresponse()


def test_only_requests_with_the_token_pass(proxied):
    port, _ = proxied
    assert _get(port, "/").status == 403
    assert _get(port, f"/?token=not-{TOKEN}").status == 403
    r = _get(port, f"/?token={TOKEN}")
    assert r.status == 200 and r.read() == b"the app\n"
    cookie = r.getheader("Set-Cookie").split(";")[0]
    name, value = cookie.split("=", 1)
    assert name == f"dstack_token_{port}" and TOKEN not in value  # the port's own; an HMAC, not the token
    # another app's cookie that SimpleCookie refuses does not hide ours
    r = _get(port, "/", {"Cookie": f'a={{"x": 1}}; {cookie}'})
    assert r.status == 200 and r.read() == b"the app\n"
    assert _get(port, "/", {"Cookie": f"{name}={TOKEN}"}).status == 403  # the token is not the cookie's value
    head = _get(port, f"/?token={TOKEN}", method="HEAD")
    assert head.status == 200 and head.getheader("Content-Length") == "8"


def test_malformed_bodies_are_refused(proxied):
    port, _ = proxied
    for headers in ({"Content-Length": "-1"}, {"Content-Length": "x"}, {"Transfer-Encoding": "chunked"}):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            s.sendall(f"POST /?token={TOKEN} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), (headers, answer)


def test_the_proxy_ends_with_its_app(proxied):
    port, proxy = proxied
    app = int(Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()[0])
    os.kill(app, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while proxy.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.returncode == 128 + signal.SIGTERM
