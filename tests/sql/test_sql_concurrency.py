"""Concurrent writers: overlapping shards at once, no duplicates, nothing lost, no deadlock."""

from __future__ import annotations

import threading
from collections import Counter

import sqlalchemy as sa
from conftest import Shard, file_entry, mixed_shard, model_metadata, sha

from sql import db, integrity, predictions, runs, shards, upsert


def run_writers(jobs) -> list[BaseException]:
    """Start every job at the same moment in its own thread; return what they raised."""
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def wrap(job):
        try:
            barrier.wait()
            job()
        except BaseException as exc:  # collected and asserted on by the test
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a writer hung (deadlock?)"
    return errors


def overlapping_writers(url: str, *, total: int, overlap_from: int, sizes=(100, 70)) -> None:
    engine = db.connect(url)
    Session = db.session_factory(engine)
    with Session.begin() as session:
        model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
        run_a = runs.start_run(session, kind="nightly", model_id=model_id)
        run_b = runs.start_run(session, kind="reprocess", model_id=model_id)

    def writer(run_id, start, stop, size, reverse):
        bounds = list(range(start, stop, size))
        if reverse:
            bounds.reverse()

        def job():
            for lo in bounds:
                shard = mixed_shard(lo, min(lo + size, stop))
                with Session.begin() as session:
                    result = shards.write_shard(
                        session, run_id=run_id, model_id=model_id, **shard.kwargs()
                    )
                    predictions.upsert_study_predictions(
                        session, model_id, run_id, study_uids=result.study_uids
                    )

        return job

    errors = run_writers(
        [
            writer(run_a, 0, total - overlap_from, sizes[0], reverse=False),
            writer(run_b, overlap_from, total, sizes[1], reverse=True),
        ]
    )
    assert not errors, errors

    everything = mixed_shard(0, total)
    expected = Counter(o["outcome"] for o in everything.outcomes)
    with engine.connect() as conn:

        def scalar(sql):
            return conn.execute(sa.text(sql)).scalar_one()

        assert scalar("SELECT COUNT(*) FROM file_outcomes") == total
        assert scalar("SELECT COUNT(DISTINCT source_uri) FROM file_outcomes") == total
        assert scalar("SELECT COUNT(*) FROM instances") == len(everything.instances)
        assert scalar("SELECT COUNT(*) FROM image_predictions") == expected["predicted"]
        rows = conn.execute(sa.text("SELECT outcome, COUNT(*) FROM file_outcomes GROUP BY outcome"))
        outcomes = {outcome: n for outcome, n in rows}
        assert outcomes == dict(expected)
        # Every study prediction equals a fresh aggregation of its images.
        stale = scalar(
            """
            SELECT COUNT(*) FROM study_predictions AS sp
            JOIN (
                SELECT study_instance_uid, COUNT(*) AS n, MAX(score) AS score
                FROM image_predictions GROUP BY study_instance_uid
            ) AS agg ON agg.study_instance_uid = sp.study_instance_uid
            WHERE agg.n <> sp.n_images OR agg.score <> sp.score
            """
        )
        assert stale == 0
        assert scalar("SELECT COUNT(*) FROM study_predictions") == scalar(
            "SELECT COUNT(DISTINCT study_instance_uid) FROM image_predictions"
        )
    with Session.begin() as session:
        assert all(v == 0 for v in integrity.check_integrity(session).values())
    engine.dispose()


def test_two_writers_with_overlapping_shards_on_postgresql(pg_url):
    overlapping_writers(pg_url, total=1200, overlap_from=400)


def test_two_writers_with_overlapping_big_shards_on_postgresql_copy_path(pg_url):
    # Shards above COPY_THRESHOLD go through COPY + staging table + one upsert per table.
    size = upsert.COPY_THRESHOLD + 200
    overlapping_writers(pg_url, total=3 * size, overlap_from=size, sizes=(size, size))


def test_two_writers_with_overlapping_shards_on_sqlite(sqlite_url):
    overlapping_writers(sqlite_url, total=400, overlap_from=150)


def test_racing_writers_of_one_uid_with_different_content_record_one_conflict(pg_url):
    engine = db.connect(pg_url)
    Session = db.session_factory(engine)
    with Session.begin() as session:
        model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
        run_id = runs.start_run(session, kind="reprocess", model_id=model_id)

    def writer(tag):
        shard = Shard()
        for i in range(20):
            file_entry(shard, i, uri=f"file:///{tag}/{i}.dcm", content=tag, score=0.5)

        def job():
            with Session.begin() as session:
                shards.write_shard(session, run_id=run_id, model_id=model_id, **shard.kwargs())

        return job

    assert not run_writers([writer("left"), writer("right")])
    with engine.connect() as conn:
        instances = conn.execute(sa.text("SELECT COUNT(*) FROM instances")).scalar_one()
        conflicts = conn.execute(sa.text("SELECT COUNT(*) FROM uid_conflicts")).scalar_one()
        per_uid = conn.execute(
            sa.text(
                "SELECT sop_instance_uid, outcome, COUNT(*) FROM file_outcomes "
                "GROUP BY sop_instance_uid, outcome"
            )
        ).all()
    assert instances == 20 and conflicts == 20
    assert Counter((outcome, n) for _, outcome, n in per_uid) == {
        ("predicted", 1): 20,
        ("failed", 1): 20,
    }
    engine.dispose()


def test_concurrent_first_use_migrates_once(db_url):
    engines = []

    def first_use():
        engines.append(db.connect(db_url))

    assert not run_writers([first_use, first_use, first_use])
    with engines[0].connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        assert versions == [(db.head_revision(),)]
    for engine in engines:
        engine.dispose()


def test_writers_of_one_run_beating_on_every_shard_do_not_deadlock(pg_url, monkeypatch):
    """Fan-out: several workers commit shards of ONE run at once (overlapping studies), each
    shard writing the run's heartbeat (throttle off: the worst case), while new runs start
    and look for stale runs (which reads and locks run rows too)."""
    import datetime as dt

    monkeypatch.setattr(runs, "HEARTBEAT_MIN_INTERVAL", dt.timedelta(0))
    engine = db.connect(pg_url)
    Session = db.session_factory(engine)
    with Session.begin() as session:
        model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
        run_id = runs.start_run(session, kind="reprocess", model_id=model_id)
        stale = runs.start_run(session, kind="nightly", model_id=model_id)
        session.execute(
            sa.text(
                "UPDATE runs SET heartbeat_at = heartbeat_at - INTERVAL '7 hours' WHERE run_id = :r"
            ),
            {"r": stale},
        )

    def worker(first: int):
        def job():
            for lo in range(first, 600, 4 * 30):
                with Session.begin() as session:
                    result = shards.write_shard(
                        session,
                        run_id=run_id,
                        model_id=model_id,
                        **mixed_shard(lo, lo + 31).kwargs(),
                    )  # one file more than the stride: neighbours share a study
                    predictions.upsert_study_predictions(
                        session, model_id, run_id, study_uids=result.study_uids
                    )

        return job

    def opener():
        for _ in range(10):
            with Session.begin() as session:
                runs.start_run(session, kind="demo", model_id=model_id)

    assert not run_writers([worker(0), worker(30), worker(60), worker(90), opener])
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.text("SELECT run_id, status FROM runs")).all())
        deadlocks = conn.execute(
            sa.text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
    assert statuses[run_id] == "running" and statuses[stale] == "abandoned"
    assert deadlocks == 0
    with Session.begin() as session:
        assert all(v == 0 for v in integrity.check_integrity(session).values())
    engine.dispose()
