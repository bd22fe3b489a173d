"""Engine, sessions and migrations. SQLite under DSTACK_HOME by default; PostgreSQL (DSTACK_DATABASE_URL=
postgresql://USER:PASSWORD@HOST:PORT/DATABASE, through asyncpg; alembic's migrations through psycopg) for a
server that a team shares. The same migrations serve both."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from dstack.core.errors import Unavailable

MIGRATIONS = Path(__file__).parent / "migrations"
# how long the server waits for the database to answer a connection before it says that it cannot reach it
CONNECT_TIMEOUT = 10

# URLs as people write them (libpq's, SQLite's) -> the async drivers the server uses
_DRIVERS = {"postgres://": "postgresql+asyncpg://", "postgresql://": "postgresql+asyncpg://",
            "sqlite://": "sqlite+aiosqlite://"}


class DatabaseUnreachable(Unavailable):
    """The server cannot use its database: the URL names none that it knows, or the database does not answer."""


def database_url(url: str) -> str:
    """The SQLAlchemy async URL of `url`: postgresql:// (or postgres://) means asyncpg, sqlite:// aiosqlite;
    a URL that names its driver is taken as it is."""
    for plain, driver in _DRIVERS.items():
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


def shown(url: str) -> str:
    """`url` with its password hidden, as messages and logs show it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


def sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


def prepare(url: str) -> None:
    """Before the server starts: `url` names a database that the server can use (DatabaseUnreachable, saying
    why, otherwise), whose schema is brought to the newest."""
    from sqlalchemy.exc import ArgumentError, InvalidRequestError, NoSuchModuleError

    hint = ("DSTACK_DATABASE_URL (or --db-url) takes postgresql://USER:PASSWORD@HOST:PORT/DATABASE, or "
            "sqlite:///PATH; unset, the server keeps a SQLite database under DSTACK_HOME")
    try:
        engine = create_async_engine(url)  # loads the dialect and its driver; connects to nothing
    except ArgumentError:
        raise DatabaseUnreachable(f"the database URL {url!r} is not a URL that the server knows", hint=hint) from None
    except (NoSuchModuleError, InvalidRequestError, ImportError) as e:
        raise DatabaseUnreachable(f"the server cannot use the database URL {shown(url)}: {_first_line(e)}",
                                  hint=hint) from None
    engine.sync_engine.dispose()
    if url.startswith("sqlite") and ":///" in url:
        folder = os.path.dirname(os.path.abspath(url.split(":///", 1)[1].split("?", 1)[0]))
        if not os.path.isdir(folder):
            raise DatabaseUnreachable(f"the folder of the SQLite database {shown(url)} does not exist: {folder}",
                                      hint=hint)
    migrate(url)


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip() or type(orig).__name__
    return text.splitlines()[0]


def migrate(url: str) -> None:
    """Bring the database to the newest schema (alembic upgrade head). A database that is there already is left
    alone without loading alembic (~0.3 s of every server start)."""
    if at_head(url):
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))  # an ini value: % is its escape
    command.upgrade(cfg, "head")


def heads() -> set[str]:
    """The newest revisions of the migrations: those that no other revision follows."""
    revisions, followed = set(), set()
    for f in (MIGRATIONS / "versions").glob("*.py"):
        text = f.read_text(encoding="utf-8")
        rev = re.search(r"^revision\s*(?::[^=]*)?=\s*['\"]([^'\"]+)", text, re.M)
        down = re.search(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", text, re.M)
        if rev:
            revisions.add(rev.group(1))
        if down:
            followed.update(re.findall(r"['\"]([^'\"]+)['\"]", down.group(1)))
    return revisions - followed


def at_head(url: str) -> bool:
    """Whether `url` is a database whose schema is the newest already. DatabaseUnreachable when it is not SQLite
    and does not answer."""
    if not url.startswith("sqlite"):
        return _stored_revisions(url) == heads()
    if ":///" not in url:
        return False
    path = url.split(":///", 1)[1]
    if not path or not os.path.exists(path):
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            stored = {row[0] for row in db.execute("SELECT version_num FROM alembic_version")}
    except sqlite3.Error:
        return False
    return bool(stored) and stored == heads()


def _stored_revisions(url: str) -> set[str]:
    """The revisions that a database server's `alembic_version` holds (none when it has no such table)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError, ProgrammingError
    from sqlalchemy.pool import NullPool

    engine = create_engine(sync_url(url), poolclass=NullPool,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT} if "+psycopg" in sync_url(url) else {})
    try:
        with engine.connect() as conn:
            try:
                return {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}
            except ProgrammingError:  # no such table: a new database
                return set()
    except DBAPIError as e:
        raise DatabaseUnreachable(
            f"the server cannot reach its database at {shown(url)}: {_first_line(e)}",
            hint="is the database server up, and do the URL's host, port, user, password and database name hold? "
                 "(DSTACK_DATABASE_URL, or --db-url)") from None
    finally:
        engine.dispose()


def make_engine(url: str) -> AsyncEngine:
    if not url.startswith("sqlite"):
        # no pre-ping (a round trip more per session: a quarter of the wall time of bench/many_jobs.py on 2 cores):
        # after a restart of the database, the first statement on a dead connection fails (503, see below) and
        # the whole pool is replaced at once
        engine = create_async_engine(url, pool_size=10, max_overflow=20,
                                     connect_args={"timeout": CONNECT_TIMEOUT} if "+asyncpg" in url else {})
        _unreachable_is_unavailable(engine, url)
        return engine
    engine = create_async_engine(url)

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(conn, _record):  # WAL: readers never wait for the writer
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    return engine


def _unreachable_is_unavailable(engine: AsyncEngine, url: str) -> None:
    """A database server that does not answer (down, restarting, cut off) is DatabaseUnreachable, which the API
    answers with 503 naming the database: runners keep their reports and send them again once it is back (a 500
    would end a report after a few tries), and the CLI says what is wrong."""
    def unreachable(e: BaseException) -> DatabaseUnreachable:
        return DatabaseUnreachable(f"the server cannot reach its database at {shown(url)}: {_first_line(e)}",
                                   hint="the database server is down or cut off; the server goes on once it answers")

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect, _record, cargs, cparams):
        try:
            return dialect.connect(*cargs, **cparams)
        except (OSError, dialect.loaded_dbapi.Error) as e:  # refused, unresolvable, timed out, starting up
            raise unreachable(e) from e

    @event.listens_for(engine.sync_engine, "handle_error")
    def _lost(context):  # a connection that broke during a statement (the server stopped, the network cut)
        if context.is_disconnect:
            raise unreachable(context.original_exception) from context.original_exception


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
