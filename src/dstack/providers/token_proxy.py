"""A token in front of a web app that has none (TensorBoard): run in the job (standard library only, any Python 3),
`python token_proxy.py LISTEN_PORT APP_PORT APP_PID TITLE`, with the token in DSTACK_APP_TOKEN.

It serves on every address at LISTEN_PORT and passes a request to the app (on 127.0.0.1:APP_PORT) only when it
carries the token: `?token=` in the URL (then a cookie keeps the browser in) or that cookie. Anything else gets 403.
The cookie is named after the port (browsers send a host's cookies to all its ports) and holds an HMAC of the
token, not the token, so that another server on the machine that gets it cannot use it to reach this one's app.
Once the app answers it prints `TITLE is ready: http://HOST:PORT/?token=...`; it exits with the app (APP_PID, its
child: the shell that started the app in the background exec'd this)."""

import hashlib
import hmac
import http.client
import http.server
import os
import secrets
import socket
import sys
import threading
import time
import urllib.parse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length", "host"}


def main() -> None:
    listen, app, pid, title = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    token = os.environ.pop("DSTACK_APP_TOKEN")
    cookie_name = f"dstack_token_{listen}"
    cookie_value = hmac.new(token.encode(), b"dstack-proxy-cookie", hashlib.sha256).hexdigest()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the app's own log says enough
            pass

        def _admitted(self) -> str:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if secrets.compare_digest(query.get("token", [""])[0].encode(), token.encode()):
                return "url"
            for header in self.headers.get_all("Cookie") or []:
                for pair in header.split(";"):  # by hand: other apps' cookies may hold what SimpleCookie refuses
                    name, _, value = pair.strip().partition("=")
                    if name == cookie_name and secrets.compare_digest(value.encode(), cookie_value.encode()):
                        return "cookie"
            return ""

        def _refuse(self, code: int, text: str) -> None:
            body = text.encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")  # an unread body must not pass for the next request
            self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def _pass(self) -> None:
            size_text = self.headers.get("Content-Length") or "0"
            if self.headers.get("Transfer-Encoding") or not size_text.isdigit() or int(size_text) > 1 << 30:
                self._refuse(400, "400: a body needs a Content-Length (up to 1 GiB), not a Transfer-Encoding")
                return
            admitted = self._admitted()
            if not admitted:
                self._refuse(403, "403: open the URL with its token (the run's logs print it)")
                return
            size = int(size_text)
            body = self.rfile.read(size) if size else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"cookie"}}
            try:
                upstream = http.client.HTTPConnection("127.0.0.1", app, timeout=600)
                upstream.request(self.command, self.path, body, headers)
                answer = upstream.getresponse()
                data = answer.read()
            except OSError as e:
                self.send_error(502, f"the app does not answer: {e}")
                return
            self.send_response(answer.status)
            for k, v in answer.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            if admitted == "url":
                self.send_header("Set-Cookie", f"{cookie_name}={cookie_value}; Path=/; HttpOnly; SameSite=Strict")
            length = answer.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _pass

    server = http.server.ThreadingHTTPServer(("", listen), Handler)
    server.daemon_threads = True

    def announce() -> None:
        for _ in range(1200):
            try:
                socket.create_connection(("127.0.0.1", app), timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        host = os.environ.get("JOB_HOSTNAME") or socket.getfqdn()
        print(f"\n{title} is ready: http://{host}:{listen}/?token={token}\n", flush=True)

    def follow_app() -> None:
        _, status = os.waitpid(pid, 0)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

    threading.Thread(target=announce, daemon=True).start()
    threading.Thread(target=follow_app, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
