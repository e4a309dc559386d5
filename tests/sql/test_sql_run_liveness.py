"""Stale runs: every run has a heartbeat (its start, then each committed shard); when a run
starts, runs still 'running' whose heartbeat is older than STALE_RUN_AFTER are marked
'abandoned'. On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
import sqlalchemy as sa
from conftest import mixed_shard, model_metadata, sha

from sql import db, rows, runs, shards
from sql.schema import Run

RUNS = Run.__table__
UTC = dt.UTC


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def run_row(Session, run_id: int) -> dict:
    with Session() as session:
        return dict(session.execute(sa.select(RUNS).where(RUNS.c.run_id == run_id)).one()._mapping)


def set_heartbeat(Session, run_id: int, when: dt.datetime) -> None:
    with Session.begin() as session:
        session.execute(sa.update(RUNS).where(RUNS.c.run_id == run_id).values(heartbeat_at=when))


def new_run(Session, model_id: int, *, age: dt.timedelta | None = None, **kwargs) -> int:
    """A running run whose heartbeat is ``age`` old (the check off while it is made)."""
    with Session.begin() as session:
        run_id = runs.start_run(
            session, kind="nightly", model_id=model_id, stale_after=None, **kwargs
        )
    if age is not None:
        set_heartbeat(Session, run_id, now() - age)
    return run_id


def close(Session, run_id: int, status: str = "completed") -> None:
    zero = dict.fromkeys(rows.RUN_COUNT_KEYS, 0)
    with Session.begin() as session:
        runs.finish_run(session, run_id, status, zero, "boom" if status == "failed" else None)


def test_a_run_starts_with_a_heartbeat_that_v_run_summary_shows(Session, model_run):
    before = now()
    _, run_id = model_run
    row = run_row(Session, run_id)
    assert row["status"] == "running"
    assert before - dt.timedelta(seconds=60) <= row["heartbeat_at"] <= now()
    with Session() as session:
        shown = session.execute(
            sa.text("SELECT status, heartbeat_at FROM v_run_summary WHERE run_id = :r"),
            {"r": run_id},
        ).one()
    assert shown[0] == "running" and shown[1] is not None


def test_each_committed_shard_is_a_heartbeat_in_its_own_transaction(Session, model_run):
    model_id, run_id = model_run
    old = now() - dt.timedelta(hours=1)
    set_heartbeat(Session, run_id, old)

    # A shard whose transaction rolls back leaves no heartbeat either.
    with pytest.raises(RuntimeError, match="crash"), Session.begin() as session:
        shards.write_shard(session, run_id=run_id, model_id=model_id, **mixed_shard(0, 4).kwargs())
        raise RuntimeError("crash before the commit")
    assert run_row(Session, run_id)["heartbeat_at"] == old

    started = now()
    with Session.begin() as session:
        shards.write_shard(session, run_id=run_id, model_id=model_id, **mixed_shard(0, 4).kwargs())
    assert run_row(Session, run_id)["heartbeat_at"] >= started


def test_heartbeats_are_written_at_most_every_interval(Session, model_run):
    _, run_id = model_run
    with Session.begin() as session:
        assert not runs.heartbeat(session, run_id)  # start_run just wrote it
    set_heartbeat(Session, run_id, now() - runs.HEARTBEAT_MIN_INTERVAL - dt.timedelta(seconds=1))
    with Session.begin() as session:
        assert runs.heartbeat(session, run_id)
        assert not runs.heartbeat(session, run_id)


def test_stale_running_runs_are_abandoned_when_a_run_starts(Session, model_run):
    model_id, _ = model_run
    stale = runs.STALE_RUN_AFTER
    dead = new_run(Session, model_id, age=stale + dt.timedelta(minutes=1))
    slow = new_run(Session, model_id, age=stale - dt.timedelta(minutes=10))
    done = new_run(Session, model_id)
    close(Session, done)
    set_heartbeat(Session, done, now() - 3 * stale)
    failed = new_run(Session, model_id)
    close(Session, failed, "failed")
    set_heartbeat(Session, failed, now() - 3 * stale)
    dead_beat = run_row(Session, dead)["heartbeat_at"]
    before = {r: run_row(Session, r) for r in (slow, done, failed)}

    with Session.begin() as session:
        opened = runs.start_run(session, kind="reprocess", model_id=model_id)

    row = run_row(Session, dead)
    assert row["status"] == "abandoned"
    assert now() - dt.timedelta(seconds=60) <= row["finished_at"] <= now()
    assert row["heartbeat_at"] == dead_beat  # the last sign of life stays what it was
    assert row["error"].startswith("abandoned: no sign of life since ")
    assert f"{dead_beat:%Y-%m-%d %H:%M:%S} UTC" in row["error"]
    assert "more than 6 hours" in row["error"] and f"when run {opened} started" in row["error"]
    assert "run the same command again" in row["error"]
    # Younger than the threshold, or already closed: untouched.
    assert {r: run_row(Session, r) for r in (slow, done, failed)} == before
    assert run_row(Session, opened)["status"] == "running"
    with Session() as session:
        summary = session.execute(
            sa.text("SELECT run_id, status, finished_at, error FROM v_run_summary ORDER BY run_id")
        ).all()
    shown = {r.run_id: r for r in summary}
    assert shown[dead].status == "abandoned" and shown[dead].finished_at is not None
    assert shown[dead].error == row["error"]
    assert shown[slow].status == "running"


def test_the_threshold_is_a_parameter_and_none_turns_the_check_off(Session, model_run):
    model_id, first = model_run
    set_heartbeat(Session, first, now() - dt.timedelta(days=30))
    with Session.begin() as session:
        runs.start_run(session, kind="demo", model_id=model_id, stale_after=None)
    assert run_row(Session, first)["status"] == "running"

    recent = new_run(Session, model_id, age=dt.timedelta(minutes=20))
    with Session.begin() as session:
        marked = runs.abandon_stale_runs(session, dt.timedelta(minutes=15))
    assert marked == [first, recent]
    assert "more than 15 min before" in run_row(Session, recent)["error"]
    with Session.begin() as session, pytest.raises(ValueError, match="positive"):
        runs.abandon_stale_runs(session, dt.timedelta(0))


def test_an_abandoned_run_that_beats_again_was_alive_and_can_close(Session, model_run):
    model_id, run_id = model_run
    set_heartbeat(Session, run_id, now() - 2 * runs.STALE_RUN_AFTER)
    with Session.begin() as session:
        assert runs.abandon_stale_runs(session) == [run_id]

    with Session.begin() as session:  # its next shard
        shards.write_shard(session, run_id=run_id, model_id=model_id, **mixed_shard(0, 3).kwargs())
    row = run_row(Session, run_id)
    assert (row["status"], row["finished_at"], row["error"]) == ("running", None, None)

    with Session.begin() as session:
        assert runs.abandon_stale_runs(session) == []  # fresh now
    set_heartbeat(Session, run_id, now() - 2 * runs.STALE_RUN_AFTER)
    with Session.begin() as session:
        runs.abandon_stale_runs(session)
    counts = {"files_seen": 3, "predicted": 2, "skipped": 0, "failed": 1}
    with Session.begin() as session:  # it closes without another shard
        runs.finish_run(session, run_id, "completed", counts)
    row = run_row(Session, run_id)
    assert (row["status"], row["error"], row["files_seen"]) == ("completed", None, 3)
    with Session.begin() as session, pytest.raises(ValueError, match="already completed"):
        runs.finish_run(session, run_id, "completed", counts)


def test_the_status_constraint_allows_abandoned_and_nothing_new(engine, model_run):
    _, run_id = model_run
    with engine.begin() as conn:
        conn.execute(sa.update(RUNS).where(RUNS.c.run_id == run_id).values(status="abandoned"))
    with pytest.raises(sa.exc.IntegrityError, match="ck_runs_status"), engine.begin() as conn:
        conn.execute(sa.update(RUNS).where(RUNS.c.run_id == run_id).values(status="lost"))


def test_a_heartbeat_committed_meanwhile_wins_over_the_marking(pg_url):
    """PostgreSQL: the marker re-checks each run under its row lock."""
    engine = db.connect(pg_url)
    try:
        Session = db.session_factory(engine)
        with Session.begin() as session:
            model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
        run_id = new_run(Session, model_id, age=2 * runs.STALE_RUN_AFTER)
        marked: list[int] = []
        beating = Session()
        beating.begin()
        assert runs.heartbeat(beating, run_id)  # holds the run's row, not committed yet

        def mark() -> None:
            with Session.begin() as session:
                marked.extend(runs.abandon_stale_runs(session))

        marker = threading.Thread(target=mark)
        marker.start()
        time.sleep(1.0)
        assert marker.is_alive(), "the marker should wait for the heartbeat's row lock"
        beating.commit()
        beating.close()
        marker.join(timeout=30)
        assert marked == [] and run_row(Session, run_id)["status"] == "running"
    finally:
        engine.dispose()


def test_upgrading_an_old_database_gives_runs_a_heartbeat_and_abandons_old_ones(db_url):
    engine = db.get_engine(db_url)
    try:
        db.upgrade(engine, "0002")
        old = dt.datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
        Session = db.session_factory(engine)
        with Session.begin() as session:
            model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
            for status, finished in (("running", None), ("completed", old.replace(hour=9))):
                session.execute(
                    sa.text(
                        "INSERT INTO runs (kind, parameters, selection_policy, model_id, status, "
                        "started_at, finished_at) VALUES ('nightly', '{}', '{}', :m, :s, :t, :f)"
                    ).bindparams(
                        sa.bindparam("t", type_=RUNS.c.started_at.type),
                        sa.bindparam("f", type_=RUNS.c.finished_at.type),
                    ),
                    {"m": model_id, "s": status, "t": old, "f": finished},
                )
            session.execute(
                sa.text(
                    "INSERT INTO studies (study_instance_uid, first_seen_run_id) VALUES ('1.2', 1)"
                )
            )
        db.upgrade(engine)  # SQLite rebuilds runs, which studies references
        assert db.current_revision(engine) == db.head_revision()
        with Session() as session:
            beats = session.execute(
                sa.select(RUNS.c.status, RUNS.c.heartbeat_at).order_by(RUNS.c.run_id)
            ).all()
        assert [tuple(b) for b in beats] == [
            ("running", old),
            ("completed", old.replace(hour=9)),
        ]
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":  # enforcement is back on for the pool
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        with Session.begin() as session:
            runs.start_run(session, kind="nightly", model_id=model_id)
        assert run_row(Session, 1)["status"] == "abandoned"
    finally:
        engine.dispose()


def test_the_screening_run_marks_stale_runs_and_each_shard_beats(db_url, tmp_path):
    """The functions the screen flow calls: open_run (start) and persist_shard (heartbeat)."""
    from model.checkpoint import load_checkpoint, untrained_checkpoint
    from tasks import screening

    untrained_checkpoint(version="liveness-1", name="test").save(tmp_path / "model.pt")
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    engine = db.connect(db_url)
    try:
        first = screening.open_run(
            engine, checkpoint, kind="nightly", source="/drop", parameters={}, selection_policy={}
        )
        set_heartbeat(first.sessions, first.run_id, now() - 2 * runs.STALE_RUN_AFTER)
        second = screening.open_run(
            engine, checkpoint, kind="reprocess", source="/old", parameters={}, selection_policy={}
        )
        row = run_row(first.sessions, first.run_id)
        assert row["status"] == "abandoned" and f"run {second.run_id}" in row["error"]

        set_heartbeat(first.sessions, second.run_id, now() - dt.timedelta(hours=1))
        started = now()
        screening.persist_shard(
            first.sessions,
            run_id=second.run_id,
            model_id=second.model_id,
            rows=screening.ShardRows(),
            force=False,
        )
        assert run_row(first.sessions, second.run_id)["heartbeat_at"] >= started
    finally:
        engine.dispose()
