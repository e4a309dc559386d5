"""Migrations: one Alembic history for both databases, `alembic check` clean, views in sync."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

from sql import db
from sql.schema import metadata

REPO = Path(__file__).resolve().parents[2]
VIEWS_DIR = REPO / "sql" / "views"
CONTRACT = {
    "v_study_results": [
        "study_instance_uid",
        "accession_number",
        "study_date",
        "model_name",
        "model_version",
        "score",
        "label",
        "threshold",
        "n_images",
        "run_id",
        "predicted_at",
    ],
    "v_instance_outcomes": [
        "source_uri",
        "sop_instance_uid",
        "study_instance_uid",
        "outcome",
        "reason",
        "score",
        "model_version",
        "run_id",
    ],
    "v_review_queue": [
        "study_instance_uid",
        "accession_number",
        "study_date",
        "model_name",
        "model_version",
        "score",
        "threshold",
        "n_images",
        "thumbnail_path",
    ],
    "v_run_summary": [
        "run_id",
        "kind",
        "source",
        "started_at",
        "finished_at",
        "status",
        "files_seen",
        "predicted",
        "skipped",
        "failed",
    ],
}


def alembic_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    """`alembic ARGS` from the repository root, the URL from the documented env variable."""
    env = {**os.environ, "CXR_SCREEN_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def view_files() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(VIEWS_DIR.glob("*.sql"))}


def test_alembic_upgrade_head_then_check_is_clean(db_url):
    up = alembic_cli(db_url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    check = alembic_cli(db_url, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr

    engine = db.get_engine(db_url)
    try:
        assert db.current_revision(engine) == db.head_revision()
        inspector = sa.inspect(engine)
        assert set(metadata.tables) <= set(inspector.get_table_names())
        assert set(inspector.get_view_names()) == set(view_files())
    finally:
        engine.dispose()


def test_alembic_check_notices_a_schema_drift(sqlite_url):
    assert alembic_cli(sqlite_url, "upgrade", "head").returncode == 0
    engine = db.get_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN stray TEXT")
    engine.dispose()
    check = alembic_cli(sqlite_url, "check")
    assert check.returncode != 0
    assert "stray" in check.stdout + check.stderr


def test_connect_migrates_on_first_use_and_again_is_a_no_op(db_url):
    engine = db.connect(db_url)
    engine.dispose()
    engine = db.connect(db_url)
    try:
        assert db.current_revision(engine) == db.head_revision()
        with engine.connect() as conn:
            versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        assert versions == [(db.head_revision(),)]
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(db_url):
    engine = db.connect(db_url)
    try:
        cfg = db.alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        inspector = sa.inspect(engine)
        assert set(inspector.get_table_names()) <= {"alembic_version"}
        assert inspector.get_view_names() == []
        db.upgrade(engine)
        inspector = sa.inspect(engine)
        assert set(metadata.tables) <= set(inspector.get_table_names())
        assert set(inspector.get_view_names()) == set(view_files())
    finally:
        engine.dispose()


def test_a_database_from_a_newer_version_is_refused(sqlite_url):
    engine = db.connect(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(RuntimeError, match="9999_future.*does not know"):
        db.ensure_schema(engine)
    engine.dispose()


def test_every_view_file_is_frozen_in_the_newest_migration_that_defines_it():
    """Changing sql/views/X.sql needs a new revision whose VIEWS carries the new text."""
    script = ScriptDirectory.from_config(db.alembic_config())
    newest: dict[str, tuple[str, str]] = {}
    for revision in script.walk_revisions():  # head first
        spec = importlib.util.spec_from_file_location(f"rev_{revision.revision}", revision.path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, sql in getattr(module, "VIEWS", {}).items():
            newest.setdefault(name, (revision.revision, sql))
    files = view_files()
    assert set(newest) == set(files)
    stale = [name for name, (_, sql) in newest.items() if sql != files[name]]
    assert not stale, (
        f"view file(s) {stale} differ from the SQL frozen in their newest migration: "
        "add a revision that recreates them with the new text"
    )


def test_contract_views_have_the_contract_columns(engine):
    with engine.connect() as conn:
        for view, columns in CONTRACT.items():
            keys = list(conn.exec_driver_sql(f"SELECT * FROM {view} WHERE 1 = 0").keys())
            assert keys[: len(columns)] == columns, view
    assert set(CONTRACT) <= set(view_files())


def test_normalize_url():
    assert db.normalize_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert db.normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(ValueError, match="'mysql' is not supported"):
        db.normalize_url("mysql://u@h/d")


def test_sqlite_engine_uses_wal_foreign_keys_and_immediate_transactions(sqlite_url):
    engine = db.connect(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        # A write transaction holds the write lock from BEGIN: a second writer cannot start.
        other = db.get_engine(sqlite_url, connect_args={"timeout": 0.1})
        with engine.begin():
            with pytest.raises(sa.exc.OperationalError, match="locked"), other.begin():
                pass
            # ... while a deferred (read) transaction still can.
            with other.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                assert conn.exec_driver_sql("SELECT COUNT(*) FROM runs").scalar() == 0
            with db.session_factory(other, read_only=True).begin() as session:
                assert session.execute(sa.text("SELECT COUNT(*) FROM runs")).scalar() == 0
        other.dispose()
    finally:
        engine.dispose()


def test_postgresql_sessions_run_in_utc(pg_url):
    engine = db.get_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
    finally:
        engine.dispose()
