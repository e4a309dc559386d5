"""How a run ends: completed, failed or interrupted (SIGINT/SIGTERM), each closed after its last
committed shard with the counts of its committed rows; 'interrupted' in the runs table's CHECK
and in v_run_summary. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter

import pytest
import sqlalchemy as sa
from alembic import command
from conftest import mixed_shard, model_metadata, sha

from sql import db, runs, shards
from sql.schema import RUN_STATUSES, Run

RUNS = Run.__table__


def summary(engine, run_id: int) -> dict:
    with engine.connect() as conn:
        return dict(
            conn.execute(sa.text("SELECT * FROM v_run_summary WHERE run_id = :r"), {"r": run_id})
            .mappings()
            .one()
        )


def test_an_interrupted_run_records_the_counts_of_its_committed_shards(Session, engine, model_run):
    model_id, run_id = model_run
    committed: Counter = Counter()
    for start in (0, 30):  # two shards commit; the third never started (the signal came)
        with Session.begin() as session:
            result = shards.write_shard(
                session, run_id=run_id, model_id=model_id, **mixed_shard(start, start + 30).kwargs()
            )
        committed.update(result.outcome_counts)
    counts = {**{k: committed[k] for k in ("predicted", "skipped", "failed")}}
    counts["files_seen"] = sum(counts.values())
    with Session.begin() as session:
        error = runs.interrupt_run(session, run_id, counts, "SIGTERM")

    row = summary(engine, run_id)
    assert row["status"] == "interrupted"
    assert row["error"] == error
    assert error.startswith("interrupted by SIGTERM after 60 files")
    assert "run the same command again" in error
    assert row["finished_at"] is not None
    with engine.connect() as conn:
        stored = Counter(
            dict(
                conn.execute(
                    sa.text(
                        "SELECT outcome, COUNT(*) FROM file_outcomes WHERE run_id = :r "
                        "GROUP BY outcome"
                    ),
                    {"r": run_id},
                ).all()
            )
        )
    assert (row["files_seen"], row["predicted"], row["skipped"], row["failed"]) == (
        sum(stored.values()),
        stored["predicted"],
        stored["skipped"],
        stored["failed"],
    )


def test_interrupted_counts_must_add_up_and_a_closed_run_stays_closed(Session, model_run):
    model_id, run_id = model_run
    with Session.begin() as session, pytest.raises(ValueError, match="exactly one outcome"):
        runs.interrupt_run(
            session, run_id, {"files_seen": 5, "predicted": 1, "skipped": 1, "failed": 1}
        )
    zero = {"files_seen": 0, "predicted": 0, "skipped": 0, "failed": 0}
    with Session.begin() as session:
        runs.interrupt_run(session, run_id, zero, "SIGINT")
    with Session.begin() as session, pytest.raises(ValueError, match="already interrupted"):
        runs.finish_run(session, run_id, "completed", zero)
    with Session.begin() as session:  # a late shard's heartbeat does not reopen it
        shards.write_shard(session, run_id=run_id, model_id=model_id, **mixed_shard(0, 2).kwargs())
    with Session() as session:
        status = session.execute(
            sa.select(RUNS.c.status).where(RUNS.c.run_id == run_id)
        ).scalar_one()
    assert status == "interrupted"
    with Session.begin() as session, pytest.raises(ValueError, match="'stopped'"):
        runs.finish_run(session, run_id, "stopped", zero)


def test_the_status_constraint_allows_interrupted(engine, model_run):
    _, run_id = model_run
    assert "interrupted" in RUN_STATUSES
    with engine.begin() as conn:
        conn.execute(sa.update(RUNS).where(RUNS.c.run_id == run_id).values(status="interrupted"))
    with pytest.raises(sa.exc.IntegrityError, match="ck_runs_status"), engine.begin() as conn:
        conn.execute(sa.update(RUNS).where(RUNS.c.run_id == run_id).values(status="paused"))


def test_revision_0006_on_a_database_with_runs_and_back(db_url):
    """Upgrading a 0005 database keeps its runs (now allowed 'interrupted') and adds the
    fingerprint columns; downgrading turns interrupted runs into failed ones."""
    engine = db.get_engine(db_url)
    try:
        db.upgrade(engine, "0005")
        Session = db.session_factory(engine)
        with Session.begin() as session:
            session.execute(
                sa.text(
                    "INSERT INTO runs (kind, parameters, selection_policy, status, started_at) "
                    "VALUES ('nightly', '{}', '{}', 'completed', CURRENT_TIMESTAMP)"
                )
            )
        db.upgrade(engine)
        assert db.schema_differences(engine) == []
        columns = {c["name"] for c in sa.inspect(engine).get_columns("instances")}
        assert {"pixel_fingerprint", "codestream_fingerprint"} <= columns
        with Session.begin() as session:
            model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
            run_id = runs.start_run(session, kind="reprocess", model_id=model_id)
        zero = {"files_seen": 0, "predicted": 0, "skipped": 0, "failed": 0}
        with Session.begin() as session:
            runs.interrupt_run(session, run_id, zero, "SIGINT")
        assert summary(engine, run_id)["status"] == "interrupted"

        cfg = db.alembic_config()
        with db.migration_transaction(engine) as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0005")
        with engine.connect() as conn:
            statuses = conn.exec_driver_sql("SELECT status FROM runs ORDER BY run_id").scalars()
            assert list(statuses) == ["completed", "failed"]
        columns = {c["name"] for c in sa.inspect(engine).get_columns("instances")}
        assert "pixel_fingerprint" not in columns
        db.upgrade(engine)
        assert db.schema_differences(engine) == []
    finally:
        engine.dispose()
