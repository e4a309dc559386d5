"""Fixtures for the reliability tests: a Prefect API for CLI subprocesses, a model, databases."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from reliability_support import make_model


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A temporary Prefect server (started once) that the CLI processes under test report to,
    so that each of them does not start its own; its database holds their logs and artifacts."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other OS users can traverse (pytest's tmp_path is mode 0700)."""
    from bad_corpus import remove

    path = Path(tempfile.mkdtemp(prefix="cxr-reliability-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        remove(path)


@pytest.fixture
def pg_database(pg_url) -> Iterator:
    """``pg_url`` plus a factory of further fresh databases on the same server (dropped after)."""
    made: list[str] = []
    admin = sa.create_engine(
        pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT", pool_pre_ping=True
    )

    def another() -> str:
        name = f"cxr_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return pg_url.rsplit("/", 1)[0] + f"/{name}"

    try:
        yield pg_url, another
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
