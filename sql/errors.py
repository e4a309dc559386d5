"""Which database errors mean what: permission refused, worth retrying, or one file's data.

``DB_RETRIES`` is the one retry setting of every Prefect task that touches the database::

    @task(name="persist-shard", **DB_RETRIES)

It retries only a lost or refused connection (a database restart, a network blip, SQLite's
busy timeout), about 45 s in all; bad data is never retried (it would fail the same way).
Prefect is imported for type checking only: ``sql`` has no runtime dependency on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas.objects import State, TaskRun

_INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL SQLSTATE
# Words in a driver's message that mean the connection, not the statement, failed.
_TRANSIENT_WORDS = (
    "connection",
    "could not connect",
    "server closed",
    "terminating",
    "database is locked",
    "timeout",
    "the database system is",
)


def is_insufficient_privilege(exc: BaseException) -> bool:
    """True for PostgreSQL's "permission denied" / "must be owner" errors (SQLSTATE 42501)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE


def is_transient_db_error(exc: BaseException | None) -> bool:
    """A lost or refused database connection is worth retrying; bad data never is."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        text = str(exc.orig if getattr(exc, "orig", None) else exc).lower()
        return any(word in text for word in _TRANSIENT_WORDS)
    return False


def is_data_error(exc: BaseException | None) -> bool:
    """A value one file brought, refused by a row check (``ValueError``, e.g.
    ``sql.rows.RowValueError``) or by the database (``DataError``: NUL in text, NaN in JSON, a
    number out of range; ``IntegrityError``: a CHECK or NOT NULL constraint). Such an error
    follows the file, not the database: ``sql.shards.write_shard`` records the file as failed
    and stores the rest. A lost connection is never a data error (it is retried), nor is a
    schema problem (``OperationalError`` / ``ProgrammingError``: a missing column)."""
    if exc is None or is_transient_db_error(exc):
        return False
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        return False
    if isinstance(exc, sa.exc.StatementError):  # a bind processor refused a value
        return isinstance(exc.orig, ValueError | OverflowError)
    return isinstance(exc, ValueError | OverflowError)


def retry_on_transient_db_error(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    """Prefect's ``retry_condition_fn`` for tasks that use the database: retry a failed run
    only when its exception is a transient database error (``is_transient_db_error``)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as inner:  # the state could not give its result: judge that error
        exc = inner
    return is_transient_db_error(exc if isinstance(exc, BaseException) else None)


#: Keyword arguments of ``prefect.task`` for every task that reads or writes the database.
DB_RETRIES: dict[str, Any] = dict(
    retries=4,
    retry_delay_seconds=[1, 3, 10, 30],
    retry_condition_fn=retry_on_transient_db_error,
)
