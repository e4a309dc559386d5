"""Fail before starting: a database whose tables, columns or views differ from the schema is
refused when connecting (before a run row is written), naming what differs and what to run;
`cxr-screen db upgrade` recreates missing or altered views."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from sql import db


@pytest.fixture
def migrated(db_url):
    engine = db.connect(db_url)
    yield db_url, engine
    engine.dispose()


def execute(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def runs_recorded(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT COUNT(*) FROM runs").scalar_one()


def test_a_migrated_database_matches(migrated):
    _, engine = migrated
    assert db.schema_differences(engine) == []
    assert set(db.expected_views()) == {p.stem for p in db.VIEWS_DIR.glob("*.sql")}
    assert db.expected_views()["v_run_summary"][:6] == (
        "run_id",
        "kind",
        "source",
        "started_at",
        "finished_at",
        "status",
    )


def test_a_dropped_column_is_named_before_anything_is_written(migrated):
    url, engine = migrated
    if engine.dialect.name == "sqlite":  # SQLite refuses to drop a column a view reads
        execute(engine, "DROP VIEW v_instance_outcomes")
        execute(engine, "ALTER TABLE file_outcomes DROP COLUMN facts")
    else:  # PostgreSQL drops the views that read it with CASCADE
        execute(engine, "ALTER TABLE file_outcomes DROP COLUMN facts CASCADE")
    with pytest.raises(db.SchemaMismatch) as refused:
        db.connect(url)
    message = str(refused.value)
    assert "table file_outcomes has no column facts" in message
    assert "view v_instance_outcomes is missing" in message
    assert "cxr-screen db upgrade" in message and "backup" in message
    assert "unreachable" not in message
    assert runs_recorded(engine) == 0
    with pytest.raises(db.SchemaMismatch):  # an upgrade cannot bring the column back
        db.connect(url, repair=True)


def test_a_dropped_or_altered_view_is_noticed_and_db_upgrade_restores_it(migrated, monkeypatch):
    url, engine = migrated
    execute(
        engine,
        "DROP VIEW v_run_summary",
        "DROP VIEW v_review_queue",
        "CREATE VIEW v_review_queue AS SELECT study_instance_uid FROM studies",
    )
    with pytest.raises(db.SchemaMismatch) as refused:
        db.connect(url)
    assert refused.value.differences == [
        "view v_review_queue has no columns accession_number, study_date, model_name, "
        "model_version, score, threshold, n_images, thumbnail_path, run_id, predicted_at, "
        "model_id",
        "view v_run_summary is missing",
    ]
    assert str(refused.value).endswith("run `cxr-screen db upgrade` to recreate the views")

    from cli.app import app

    monkeypatch.setenv("CXR_SCREEN_DATABASE_URL", url)
    result = CliRunner().invoke(app, ["db", "upgrade", "--db", url])
    assert result.exit_code == 0, result.output
    assert db.schema_differences(engine) == []
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT run_id, status FROM v_run_summary").all()
    db.connect(url).dispose()


def test_a_view_with_its_columns_in_another_order_is_a_difference(migrated):
    _, engine = migrated
    execute(
        engine,
        "DROP VIEW v_run_summary",
        "CREATE VIEW v_run_summary AS SELECT r.kind, r.run_id, r.source, r.started_at, "
        "r.finished_at, r.status, r.files_seen, r.predicted, r.skipped, r.failed, "
        "NULL AS model_name, NULL AS model_version, r.model_id, r.prefect_flow_run_id, r.error, "
        "r.heartbeat_at FROM runs AS r",
    )
    assert db.schema_differences(engine) == ["view v_run_summary has its columns in another order"]
    assert db.repair_views(engine) == ["v_run_summary"]
    assert db.schema_differences(engine) == []


def test_extra_tables_columns_and_views_are_not_differences(migrated):
    _, engine = migrated
    execute(
        engine,
        "CREATE TABLE dba_notes (note TEXT)",
        "CREATE VIEW v_dba AS SELECT note FROM dba_notes",
        "ALTER TABLE runs ADD COLUMN ticket TEXT",
    )
    assert db.schema_differences(engine) == []
