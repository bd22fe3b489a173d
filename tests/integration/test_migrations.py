"""Migrations on real databases, SQLite and PostgreSQL alike: alembic brings a new database to the schema of the
tables' models, down and up again, and is not loaded once the schema is the newest; a database the server cannot
use is said to be so before the server starts."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from dstack.server.db.session import MIGRATIONS, at_head, heads, migrate, sync_url
from dstack.server.db.tables import Base


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    return cfg


def _differences(url: str) -> list:
    """What alembic's autogenerate finds between the database's schema and the tables' models."""
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def test_the_heads_read_from_the_files_are_alembics():
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert heads() == set(ScriptDirectory.from_config(cfg).get_heads())


def test_the_migrations_make_the_models_schema_down_and_up_again(db_url):
    assert not at_head(db_url)
    migrate(db_url)
    assert at_head(db_url)
    assert _differences(db_url) == []
    command.downgrade(_config(db_url), "base")  # every step's downgrade (batch_alter_table on both)
    assert not at_head(db_url)
    migrate(db_url)
    assert _differences(db_url) == [] and at_head(db_url)


def test_a_database_of_an_older_schema_is_brought_up_with_its_rows(db_url):
    command.upgrade(_config(db_url), "0002")
    engine = create_engine(sync_url(db_url))
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO runs (name, repo_id, workflow, provider, status, submitted_at, variables, "
                              "overrides, dependencies, code) VALUES ('r-1', 'repo', 'w', 'bash', 'DONE', "
                              "'2026-12-01 10:00:00', '{}', '{}', '[]', '{}')"))
            conn.execute(text("INSERT INTO inputs (run_name, input_run, job_id, ref) VALUES ('r-1', 'p-1', 'j', 'p')"))
        migrate(db_url)
        assert at_head(db_url) and _differences(db_url) == []
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO inputs (run_name, input_run, job_id, ref) VALUES ('r-1', 'p-1', 'j', "
                              f"'{'w' * 200}:{'t' * 200}')"))
            refs = conn.execute(text("SELECT ref FROM inputs ORDER BY id")).scalars().all()
        assert refs == ["p", f"{'w' * 200}:{'t' * 200}"]
    finally:
        engine.dispose()


def test_a_database_at_the_newest_schema_is_known_as_such(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'dstack.db'}"
    assert not at_head(url)  # no file yet
    migrate(url)
    assert at_head(url)
    with sqlite3.connect(tmp_path / "dstack.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'older'")
    assert not at_head(url)
    (tmp_path / "empty.db").write_bytes(b"")
    assert not at_head(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")  # no alembic_version table


def test_a_postgresql_database_at_the_newest_schema_is_known_as_such(postgres):
    url = postgres.database()
    assert not at_head(url)  # no alembic_version table
    migrate(url)
    assert at_head(url)
    postgres.sql("UPDATE alembic_version SET version_num = 'older'", database=url.rsplit("/", 1)[1])
    assert not at_head(url)


def _serve(home, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstack.server.main", "--home", str(home), "--db-url", url],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("url", "said"), [
    ("postgresql://someone:secret@127.0.0.1:{closed}/dstack", "cannot reach its database at "
     "postgresql+asyncpg://someone:***@127.0.0.1:{closed}/dstack: connection failed: "),
    ("postgresql://postgres@127.0.0.1:{port}/no_such_db", 'database "no_such_db" does not exist'),
    ("postgres://nobody@127.0.0.1:{port}/postgres", 'role "nobody" does not exist'),
    ("not a url", "the database URL 'not a url' is not a URL that the server knows"),
    ("postgresql+psycopg2://u@h/db", "cannot use the database URL postgresql+psycopg2://u@h/db: No module named "
                                     "'psycopg2'"),
    ("sqlite:////no/such/folder/dstack.db", "the folder of the SQLite database sqlite+aiosqlite:////no/such/folder/"
                                            "dstack.db does not exist"),
])
def test_a_database_the_server_cannot_use_is_said_before_it_starts(tmp_path, postgres, url, said):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        url, said = (x.format(port=postgres.port, closed=closed) for x in (url, said))
        p = _serve(tmp_path, url)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("error: ") and said in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "\nhint: " in p.stderr and "secret" not in p.stderr
    assert not (tmp_path / "server" / "server.json").exists()
