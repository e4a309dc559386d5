"""The one upsert engine of the writers: ``INSERT ... ON CONFLICT`` for SQLite and PostgreSQL.

Every writer in ``sql/`` builds its inserts here (``dialect_insert``), so both databases get the
same statement, and bulk rows go through ``upsert_rows``::

    upsert_rows(session, table, rows, keys=["source_uri", "model_id"],
                build=lambda ins: on_conflict(ins, table, keys, update, compare, force))

Rows are sorted by key so that concurrent writers lock rows in the same order and do not
deadlock. On PostgreSQL, batches of ``COPY_THRESHOLD`` rows or more go through a binary
``COPY`` into a temporary staging table and one ``INSERT ... SELECT ... ON CONFLICT``.
``member_of`` splits ``column IN (...)`` filters for either database's limits. All times are
timezone-aware UTC (``utc_now``).
"""

from __future__ import annotations

import datetime as dt
import operator
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

COPY_THRESHOLD = 2000  # rows; PostgreSQL batches at least this big use COPY + staging table
# Values per IN (...) list on SQLite (bound variables are limited to 32766 since 3.32).
_IN_CHUNK = 5000 if sqlite3.sqlite_version_info >= (3, 32) else 900
_ANY_CHUNK = 50_000  # values per bound array on PostgreSQL

#: ``verify(session, rows, staged)``: a reference check run before the insert; ``staged`` is
#: the staging table (a ``sa.table``) on the COPY path, else None.
Verify = Callable[[Session, list[dict[str, Any]], Any], None]


def utc_now() -> dt.datetime:
    """Now, timezone-aware UTC (every timestamp the writers store)."""
    return dt.datetime.now(dt.UTC)


def dialect_insert(session: Session, table: sa.Table):
    """``INSERT`` for the session's database, with ``on_conflict_do_update/nothing``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {dialect!r}; use SQLite or PostgreSQL")


def on_conflict(
    ins,
    table: sa.Table,
    keys: Sequence[str],
    update: Sequence[str],
    compare: Sequence[str],
    force: bool,
):
    """ON CONFLICT (keys): update ``update`` columns, only where a ``compare`` column differs
    (unless ``force``); with no ``update`` columns, DO NOTHING."""
    if not update:
        return ins.on_conflict_do_nothing(index_elements=list(keys))
    excluded = ins.excluded
    where = None
    if not force:
        where = sa.or_(*(table.c[c].is_distinct_from(excluded[c]) for c in compare))
    return ins.on_conflict_do_update(
        index_elements=list(keys), set_={c: excluded[c] for c in update}, where=where
    )


def upsert_rows(
    session: Session,
    table: sa.Table,
    rows: list[dict[str, Any]],
    *,
    keys: Sequence[str],
    build: Callable[[Any], Any],
    verify: Verify | None = None,
) -> None:
    """Insert ``rows`` (uniform keys, unique on ``keys``) with the conflict clause ``build``
    adds, in key order; PostgreSQL batches of COPY_THRESHOLD rows or more go through COPY.

    ``verify(session, rows, staged)`` runs before the insert (see ``Verify``).
    """
    if not rows:
        return
    rows = sorted(rows, key=lambda r: tuple(r[k] for k in keys))
    if session.get_bind().dialect.name == "postgresql" and len(rows) >= COPY_THRESHOLD:
        _copy_upsert(session, table, rows, keys=keys, build=build, verify=verify)
        return
    if verify is not None:
        verify(session, rows, None)
    session.execute(build(dialect_insert(session, table)), rows)


def member_of(session: Session, column: sa.ColumnElement, values: Iterable[str]):
    """Filters ``column IN values``, one per chunk, in sorted order: on PostgreSQL one bound
    array per 50,000 values (``= ANY(:array)``), on SQLite IN lists of _IN_CHUNK values."""
    ordered = sorted(set(values))
    if session.get_bind().dialect.name == "postgresql":
        for chunk in _chunks(ordered, _ANY_CHUNK):
            yield column == sa.any_(sa.literal(list(chunk), postgresql.ARRAY(sa.Text)))
    else:
        for chunk in _chunks(ordered, _IN_CHUNK):
            yield column.in_(chunk)


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _copy_upsert(
    session: Session,
    table: sa.Table,
    rows: list[dict[str, Any]],
    *,
    keys: Sequence[str],
    build: Callable[[Any], Any],
    verify: Verify | None,
) -> None:
    columns = list(rows[0])
    connection = session.connection()
    stage = _stage_rows(connection, table, columns, rows)
    staged = sa.table(stage, *(sa.column(c) for c in columns))
    if verify is not None:
        verify(session, rows, staged)
    select = sa.select(*(staged.c[c] for c in columns)).order_by(*(staged.c[k] for k in keys))
    # Sort the batch in memory (the default 4MB work_mem spills 100k rows to disk), then put
    # the caller's setting back.
    work_mem = connection.exec_driver_sql("SHOW work_mem").scalar_one()
    connection.execute(sa.select(sa.func.set_config("work_mem", "64MB", True)))
    connection.execute(build(postgresql.insert(table).from_select(columns, select)))
    connection.execute(sa.select(sa.func.set_config("work_mem", work_mem, True)))
    connection.exec_driver_sql(f"DROP TABLE {stage}")


def _stage_rows(
    connection: sa.Connection, table: sa.Table, columns: list[str], rows: list[dict[str, Any]]
) -> str:
    """COPY ``rows`` into a new temporary table shaped like ``table``; returns its name."""
    stage = f"_stage_{table.name}_{uuid.uuid4().hex[:12]}"
    column_list = ", ".join(f'"{c}"' for c in columns)
    # The staged columns with the table's types (collations included), without constraints.
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {stage} ON COMMIT DROP AS "
        f"SELECT {column_list} FROM {table.name} WITH NO DATA"
    )
    # Binary COPY (no text formatting and parsing of numbers and timestamps), typed by the
    # staging table's column types; JSON values go through psycopg's Jsonb adapter.
    oids = dict(
        connection.execute(
            sa.text(
                "SELECT attname, atttypid FROM pg_attribute "
                "WHERE attrelid = CAST(:stage AS regclass) AND attnum > 0"
            ),
            {"stage": stage},
        ).all()
    )
    from psycopg.types.json import Jsonb  # the COPY path is PostgreSQL-only

    json_columns = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, sa.JSON)]
    pick = operator.itemgetter(*columns)
    driver_connection = connection.connection.driver_connection
    with (
        driver_connection.cursor() as cursor,
        cursor.copy(f"COPY {stage} ({column_list}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.set_types([oids[c] for c in columns])
        if json_columns:
            for row in rows:
                values = list(pick(row))
                for i in json_columns:
                    values[i] = Jsonb(values[i])
                copy.write_row(values)
        else:
            for row in rows:
                copy.write_row(pick(row))
    return stage
