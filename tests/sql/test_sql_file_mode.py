"""A new SQLite results file is owner-only (0600) whatever the umask; an existing file's mode
is left alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sql import db


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_a_new_results_file_is_created_owner_only(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "nested" / "results.db"
    engine = db.connect(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:  # a write: the WAL and shared-memory files exist now
            conn.exec_driver_sql(
                "INSERT INTO watermarks VALUES ('w', '2026-01-01', '{}', NULL, '2026-01-01')"
            )
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert all(f.exists() for f in files)
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        engine.dispose()
    assert mode(path) == 0o600


def test_an_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    engine = db.connect(f"sqlite:///{path}")
    try:
        assert db.current_revision(engine) == db.head_revision()  # an empty file: migrated
    finally:
        engine.dispose()
    assert mode(path) == 0o640


def test_an_in_memory_database_creates_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = db.connect("sqlite://")
    engine.dispose()
    assert list(tmp_path.iterdir()) == []
