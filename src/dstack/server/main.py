"""`python -m dstack.server.main`: the server process (foreground, or started in the background by the CLI).

State: DSTACK_HOME/server/{token (0600), server.json (url, pid, start time, version), server.lock (held while
the server runs: one server per DSTACK_HOME), port (the last one it listened on: a restarted local server comes
back at the same address, so that its runners find it), server.log, dstack.db, logs/}."""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from dstack import __version__
from dstack.core.errors import ConfigError, Unavailable
from dstack.core.home import SERVER_STOPPED, dstack_home, private_home, private_umask, write_private
from dstack.core.names import token as new_token
from dstack.core.processes import record


class AlreadyServed(Exception):
    """Another server process serves this DSTACK_HOME."""


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
    from dstack.server.db.session import database_url, prepare

    sdir = server_dir(home)
    sdir.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(sdir)  # for the process's lifetime: closed (released) only when it exits
    token = os.environ.get("DSTACK_SERVER_TOKEN") or load_or_create_token(home)
    db_url = database_url(db_url or os.environ.get("DSTACK_DATABASE_URL") or f"sqlite:///{sdir / 'dstack.db'}")
    prepare(db_url)  # DatabaseUnreachable, saying why, before the server listens
    sock = listen(host, port, sdir / "port")
    port = sock.getsockname()[1]
    settings = Settings(home=home, db_url=db_url, token=token, host=host, port=port)
    info = sdir / "server.json"

    def ready() -> None:
        record(info, os.getpid(), url=settings.url, version=__version__)
        logging.getLogger("dstack.server").info("dstack server listening on %s", settings.url)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # not a line per plugin at every start
    app = create_app(settings, on_ready=ready)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=3)
    # uvicorn raises the signal that stopped it again once it has stopped: SIGTERM then ends the process as
    # SIGINT does, through the clean-up below, not around it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        make_server(app, config, sdir / SERVER_STOPPED).run(sockets=[sock])
    finally:
        try:
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass
        lock.close()


def make_server(app, config, stopped_marker: Path):
    """uvicorn's server, which tells the app as soon as it is asked to stop: long polls (runners waiting for
    a job, CLIs following logs) answer at once, instead of being cut when the grace period ends."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # stopped on purpose (a signal): an attached `dstack run` does not start it again as crashed
            write_private(stopped_marker, "")
            ctx = getattr(app.state, "ctx", None)
            if ctx is not None:
                try:
                    asyncio.get_running_loop().call_soon_threadsafe(ctx.stop)
                except RuntimeError:  # no loop runs yet (or any more): nothing waits
                    pass
            super().handle_exit(sig, frame)

    return Server(config)


def hold_lock(sdir: Path):
    """server.lock, locked for as long as this process runs; AlreadyServed when another server holds it."""
    f = open(sdir / "server.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise AlreadyServed() from None
        raise
    return f


def listen(host: str, port: int, remembered: Path) -> socket.socket:
    """The server's listening socket. Port 0 means: the port this DSTACK_HOME's server had last (its runners
    and attached CLIs still use it after a crash), else any free one; the port is remembered."""
    asked = port
    if port == 0:
        try:
            port = int(remembered.read_text())
        except (OSError, ValueError):
            port = 0
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only then; without it every response after the
    # first on a connection waits ~40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        if e.errno != errno.EADDRINUSE or asked != 0 or port == 0:  # a port asked for is that port or none
            sock.close()
            raise
        logging.getLogger("dstack.server").warning("port %s is taken by another program: listening on another "
                                                   "one (runners started before the restart cannot find it)", port)
        sock.bind((host, 0))
    sock.listen(2048)  # clients that come before the server serves wait in the backlog, never refused
    write_private(remembered, str(sock.getsockname()[1]))
    return sock


def main() -> None:
    p = argparse.ArgumentParser(prog="dstack-server")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--db-url", default=None)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args()
    home = a.home or dstack_home()
    private_umask()  # the database, logs, code, store and runners' folders are the owner's only
    private_home(home)  # --home may name a folder other than DSTACK_HOME
    try:
        serve(home, a.host, a.port, a.db_url, a.log_level)
    except KeyboardInterrupt:  # Ctrl-C on a foreground server: it has stopped cleanly by now
        sys.exit(130)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        sys.stderr.write(f"error: {a.host}:{a.port} is taken: another program listens there; pick another "
                         "port with --port (0: the last one, else any free one)\n")
        sys.exit(1)
    except Unavailable as e:  # its database (DSTACK_DATABASE_URL) cannot be used
        sys.stderr.write(f"error: {e.message}\n" + (f"hint: {e.hint}\n" if e.hint else ""))
        sys.exit(1)
    except ConfigError as e:  # a setting in the environment that is not what it must be
        sys.stderr.write(f"error: {e.message}\n" + (f"hint: {e.hint}\n" if e.hint else ""))
        sys.exit(2)
    except AlreadyServed:
        info = server_dir(home) / "server.json"
        try:
            where = f" at {json.loads(info.read_text())['url']}"
        except (OSError, ValueError, KeyError):
            where = ""
        sys.stderr.write(f"error: another dstack server already serves {home}{where}; stop it with "
                         "`dstack server stop`, or give this one another DSTACK_HOME\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
