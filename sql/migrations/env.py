"""Alembic environment: one migration history for SQLite and PostgreSQL.

Programmatic callers (``sql.db.upgrade``) hand over an open connection in
``config.attributes["connection"]`` and own its transaction. From the command line the URL is,
in order: ``-x url=...``, ``sqlalchemy.url`` in the ini file, the ``CXR_SCREEN_DATABASE_URL``
environment variable (the CLI's documented fallback), then ``sqlite:///cxr_screen.db``.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from sql.db import get_engine, migration_transaction
from sql.schema import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("CXR_SCREEN_DATABASE_URL")
        or "sqlite:///cxr_screen.db"
    )


def _configure(**kwargs) -> None:
    dialect = (
        kwargs["connection"].dialect.name if "connection" in kwargs else kwargs["dialect_name"]
    )
    context.configure(
        target_metadata=metadata,
        render_as_batch=dialect == "sqlite",
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    from sql.db import normalize_url

    url = normalize_url(_url())
    _configure(url=url, dialect_name=url.get_backend_name(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = get_engine(_url())
    try:
        # One transaction for the whole upgrade, on SQLite too (sql.db emits BEGIN itself),
        # with SQLite's foreign keys off while tables are rebuilt (checked before the commit).
        with migration_transaction(engine) as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
