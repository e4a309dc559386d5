"""Prefect plumbing shared by the flows: quiet offline defaults and the retry rule."""

from __future__ import annotations

import os

import sqlalchemy as sa


def quiet_prefect_defaults() -> None:
    """No telemetry on an offline machine; set before Prefect is imported by a command."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The temporary local server migrates its SQLite database on first start, which takes
    # longer than Prefect's 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def is_transient_db_error(exc: BaseException | None) -> bool:
    """A lost or refused database connection is worth retrying; bad data never is."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        text = str(exc.orig if getattr(exc, "orig", None) else exc).lower()
        return any(
            s in text
            for s in (
                "connection",
                "could not connect",
                "server closed",
                "terminating",
                "database is locked",
                "timeout",
                "the database system is",
            )
        )
    return False


def retry_on_transient_db_error(task, task_run, state) -> bool:
    """``retry_condition_fn`` for Prefect tasks that write to the database."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as inner:  # the state could not give its result: judge that error
        exc = inner
    return is_transient_db_error(exc if isinstance(exc, BaseException) else None)


def quiet_console() -> None:
    """No Prefect INFO lines or server shutdown noise on the terminal.

    Call before the first flow runs: Prefect configures logging on import and passes its
    settings to the temporary server it starts. Flow and task logs still reach the Prefect API
    in full. If Prefect is already configured, its console handlers are quieted.
    """
    import logging

    quiet_prefect_defaults()
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    for name in ("pydicom", "prefect.server", "uvicorn", "prefect._internal", "docket"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "uvicorn"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL)


def fatal_reason(exc: BaseException) -> str:
    """One line for a fatal error: the message that matters, no traceback."""
    from cli.demo import DemoError
    from flows.screen import ScreenError
    from flows.train import TrainError
    from model.checkpoint import CheckpointError
    from tasks.training_data import TrainingDataError

    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        first = str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()[0]
        return f"the results database is unreachable: {first}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ScreenError | TrainError | TrainingDataError | CheckpointError | DemoError):
        return text
    return f"{type(exc).__name__}: {text}"
