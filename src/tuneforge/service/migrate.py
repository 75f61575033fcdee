"""Alembic migrations of the service's database, driven from code (no alembic.ini to ship).

``migrate(db)`` brings the schema to the newest revision (``tuneforge service migrate``;
``service start`` does it too, so an embedded SQLite service needs no separate step);
``current(db)`` says where a database stands. On SQLite the upgrade runs inside
``BEGIN IMMEDIATE``: two processes starting at once migrate one after the other.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent / "migrations"


def _config(db):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    return cfg


def migrate(db, revision: str = "head") -> str:
    """Upgrade ``db`` (a :class:`~tuneforge.service.db.Database`) to ``revision``; return the revision now."""
    from alembic import command

    cfg = _config(db)
    with db.engine.execution_options(tf_immediate=True).begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
    return current(db)


def current(db) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config_for_scripts()).get_current_head()


def _config_for_scripts():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    return cfg
