"""Shared fixtures: real databases (SQLite files and a PostgreSQL database per test)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from support import scratch_postgres_database

# Quiet, offline Prefect for every test that imports it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards.

    Fails (never skips) when the server is unreachable, with the way to start it.
    """
    with scratch_postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """Runs a test once on a SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def prefect_harness():
    """Flows run against a temporary Prefect server and database, started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    # None: wait as long as PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (set above)
    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The URL of that server, for ``cxr-screen`` subprocesses to report to, so that each of
    them does not start a temporary server of its own (~10 s of every command on 2 cores).
    Tests about the command's own temporary server leave PREFECT_API_URL unset instead."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(autouse=True)
def _torch_threads_do_not_leak():
    """A test that sets torch's thread count (training, the decode pool's inference limit)
    leaves the next test the count it found."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
