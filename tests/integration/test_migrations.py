"""Migrations on a real SQLite file: alembic runs until the schema is the newest, and not after."""

from __future__ import annotations

import sqlite3

from alembic.config import Config
from alembic.script import ScriptDirectory

from dstack.server.db.session import MIGRATIONS, at_head, heads, migrate


def test_the_heads_read_from_the_files_are_alembics():
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert heads() == set(ScriptDirectory.from_config(cfg).get_heads())


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
    assert not at_head("postgresql+asyncpg://u@h/db")
