"""Fixtures for the fan-out tests (helpers live in fanout_support.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from fanout_support import PG_ADMIN_URL


@pytest.fixture
def database_factory(tmp_path) -> Iterator[Callable[[str], str]]:
    """``make(kind)``: a new empty database, ``sqlite`` (a file) or ``postgresql`` (dropped at
    the end). PostgreSQL must be up: these tests fail, never skip, without it."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make(kind: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'results-{uuid.uuid4().hex[:8]}.db'}"
        name = f"cxr_test_{uuid.uuid4().hex[:12]}"
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        except sa.exc.OperationalError as exc:
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc.orig}", False)
        created.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
