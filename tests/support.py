"""Helpers shared by the test packages (importable as ``support``: pytest puts ``tests/`` on
``sys.path`` for the root conftest.py)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get(
    "CXR_SCREEN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def make_model(path: Path, version: str = "test-1", seed: int = 0, name: str = "test") -> Path:
    """Save an untrained LGMobileNetV2 checkpoint (weights fixed by ``seed``) at ``path``."""
    from model.checkpoint import untrained_checkpoint

    untrained_checkpoint(version=version, name=name, seed=seed).save(path)
    return path


@contextlib.contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped (connections and all) on exit.

    Fails (never skips) when the server is unreachable, with the way to start it.
    """
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL.split('@')[-1]} "
            f"({str(exc.orig).strip().splitlines()[0]}). Start it (e.g. `service postgresql start` "
            "or `pg_ctlcluster 15 main start`) or point CXR_SCREEN_TEST_POSTGRES_URL at a server "
            "with trust auth; these tests are not skipped.",
            pytrace=False,
        )
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def cli_env(home: Path, hmac_key: str = "cli-test-key") -> dict[str, str]:
    """A clean environment for a `cxr-screen` subprocess with no Prefect API: the command
    starts its own temporary server, under ``home``."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "CXR_SCREEN_HOME": str(home / "cxr"),
        "CXR_SCREEN_HMAC_KEY": hmac_key,
    }
