"""The retry rule for database errors (sql.errors) and the tasks that use it."""

from __future__ import annotations

import importlib

import pytest
import sqlalchemy as sa

from sql.errors import (
    DB_RETRIES,
    is_insufficient_privilege,
    is_transient_db_error,
    retry_on_transient_db_error,
)


class _DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _wrapped(kind: type[sa.exc.DBAPIError], message: str) -> sa.exc.DBAPIError:
    """``kind`` as SQLAlchemy raises it: the driver's exception in ``orig``."""
    return kind("INSERT ...", {}, _DriverError(message))


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_wrapped(sa.exc.OperationalError, "server closed the connection unexpectedly"), True),
        (_wrapped(sa.exc.OperationalError, "database is locked"), True),
        (_wrapped(sa.exc.InterfaceError, "connection already closed"), True),
        (_wrapped(sa.exc.OperationalError, "FATAL: the database system is starting up"), True),
        (_wrapped(sa.exc.OperationalError, "no such table: runs"), False),
        (_wrapped(sa.exc.IntegrityError, "duplicate key value violates unique constraint"), False),
        (ValueError("score of file:///a.dcm must be a number in [0, 1], got 2"), False),
        (None, False),
    ],
)
def test_only_connection_failures_are_transient(exc, transient):
    assert is_transient_db_error(exc) is transient


def test_an_invalidated_connection_is_transient_whatever_its_message():
    exc = sa.exc.DBAPIError("SELECT 1", {}, _DriverError("boom"), connection_invalidated=True)
    assert is_transient_db_error(exc)


def test_insufficient_privilege_is_sqlstate_42501():
    denied = _wrapped(sa.exc.ProgrammingError, "permission denied for table runs")
    denied.orig.sqlstate = "42501"
    other = _wrapped(sa.exc.ProgrammingError, "syntax error")
    other.orig.sqlstate = "42601"
    assert is_insufficient_privilege(denied)
    assert not is_insufficient_privilege(other)
    assert not is_insufficient_privilege(ValueError("no orig"))


class _State:
    """The part of a Prefect ``State`` the retry condition reads."""

    def __init__(self, result: object = None, raises: BaseException | None = None) -> None:
        self._result, self._raises = result, raises

    def result(self, raise_on_failure: bool = True):
        if raise_on_failure:
            raise AssertionError("the retry condition must not raise the task's exception")
        if self._raises is not None:
            raise self._raises
        return self._result


def test_retry_condition_judges_the_failed_states_exception():
    lost = _wrapped(sa.exc.OperationalError, "server closed the connection unexpectedly")
    assert retry_on_transient_db_error(None, None, _State(lost))
    assert not retry_on_transient_db_error(None, None, _State(ValueError("bad row")))
    assert not retry_on_transient_db_error(None, None, _State("a result, not an error"))
    # A state that cannot give its result: the error it raises is judged instead.
    assert retry_on_transient_db_error(None, None, _State(raises=lost))
    assert not retry_on_transient_db_error(None, None, _State(raises=KeyError("result")))


def test_retry_condition_reads_a_real_prefect_failed_state():
    from prefect.states import Failed

    lost = _wrapped(sa.exc.OperationalError, "could not connect to server")
    assert retry_on_transient_db_error(None, None, Failed(data=lost))
    assert not retry_on_transient_db_error(None, None, Failed(data=ValueError("bad row")))


def test_every_database_task_uses_the_one_retry_setting():
    """The Prefect tasks that retry all use DB_RETRIES (no second retry setting), and the
    tasks that open, persist and close runs are among them."""
    from prefect import Task

    retrying: dict[str, Task] = {}
    for module in ("tasks.prefect_tasks", "tasks.prefect_tasks_train"):
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, Task) and value.retries:
                retrying[value.name] = value
    assert {"open-run", "persist-shard", "close-run", "record-training"} <= set(retrying)
    for name, task in retrying.items():
        assert task.retries == DB_RETRIES["retries"], name
        assert task.retry_delay_seconds == DB_RETRIES["retry_delay_seconds"], name
        assert task.retry_condition_fn is retry_on_transient_db_error, name
