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


class PrefectPrestart:
    """Start Prefect's temporary local server in a thread while the caller imports torch.

    A flow call with no ``PREFECT_API_URL`` starts that server itself (~5.5 s here) before
    running anything; started this way it overlaps the ~4 s of importing torch and the model.
    ``join()`` before calling a flow. A failure here is left for the flow call to report.
    """

    def __init__(self) -> None:
        import threading

        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="prefect-prestart", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

            if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                return
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except BaseException as exc:  # reported by the flow call, which tries again
            self.error = exc

    def join(self) -> None:
        self._thread.join()
