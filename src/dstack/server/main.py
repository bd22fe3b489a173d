"""`python -m dstack.server.main`: the server process (foreground, or started in the background by the CLI).

State: DSTACK_HOME/server/{token (0600), server.json (url, pid, version), server.log, dstack.db, logs/}."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path

from dstack import __version__
from dstack.core.home import dstack_home, write_private
from dstack.core.names import token as new_token


def server_dir(home: Path) -> Path:
    return home / "server"


def load_or_create_token(home: Path) -> str:
    path = server_dir(home) / "token"
    if path.exists():
        return path.read_text().strip()
    tok = new_token()
    write_private(path, tok)
    return tok


def serve(home: Path, host: str = "127.0.0.1", port: int = 0, db_url: str | None = None,
          log_level: str = "warning") -> None:
    import uvicorn

    from dstack.server.app import create_app
    from dstack.server.context import Settings

    sdir = server_dir(home)
    sdir.mkdir(parents=True, exist_ok=True)
    token = os.environ.get("DSTACK_SERVER_TOKEN") or load_or_create_token(home)
    db_url = db_url or os.environ.get("DSTACK_DATABASE_URL") or f"sqlite+aiosqlite:///{sdir / 'dstack.db'}"
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only then; without it every response after the
    # first on a connection waits ~40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # clients that come before the server serves wait in the backlog, never refused
    port = sock.getsockname()[1]
    settings = Settings(home=home, db_url=db_url, token=token, host=host, port=port)
    info = sdir / "server.json"

    def ready() -> None:
        write_private(info, json.dumps({"url": settings.url, "pid": os.getpid(), "version": __version__}))
        logging.getLogger("dstack.server").warning("dstack server listening on %s", settings.url)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(create_app(settings, on_ready=ready), log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        try:
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass


def main() -> None:
    p = argparse.ArgumentParser(prog="dstack-server")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--db-url", default=None)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args()
    serve(a.home or dstack_home(), a.host, a.port, a.db_url, a.log_level)


if __name__ == "__main__":
    main()
