"""Fixtures for flow tests: one Prefect test harness (a temporary server) for the session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """Flows run against a temporary Prefect server and database, started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    # None: wait as long as PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (tests/conftest.py)
    with prefect_test_harness(server_startup_timeout=None):
        yield
