"""PostgreSQL reviewer role: reads the views, appends reviews, touches nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import mixed_shard, model_metadata, sha

from sql import db, predictions, runs, shards

VIEWS = sorted(p.stem for p in (Path(db.__file__).parent / "views").glob("*.sql"))
STUDY = "1.2.826.0.1.3680043.2.0"


@pytest.fixture(scope="module")
def reviewer_db(module_pg_url):
    engine = db.connect(module_pg_url)
    Session = db.session_factory(engine)
    with Session.begin() as session:
        model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
        run_id = runs.start_run(session, kind="demo", model_id=model_id)
        result = shards.write_shard(
            session, run_id=run_id, model_id=model_id, **mixed_shard(0, 10).kwargs()
        )
        predictions.upsert_study_predictions(
            session, model_id, run_id, study_uids=result.study_uids
        )
    db.apply_reviewer_role(engine)
    db.apply_reviewer_role(engine)  # idempotent
    yield engine
    engine.dispose()


def as_reviewer(engine, sql: str, commit: bool = False):
    with engine.connect() as conn:
        conn.exec_driver_sql("SET LOCAL ROLE cxr_reviewer")
        result = conn.exec_driver_sql(sql)
        rows = result.all() if result.returns_rows else None
        if commit:
            conn.commit()
        return rows


def test_reviewer_reads_every_view(reviewer_db):
    for view in VIEWS:
        as_reviewer(reviewer_db, f"SELECT * FROM {view}")
    queue = as_reviewer(reviewer_db, "SELECT study_instance_uid FROM v_review_queue")
    assert queue, "the scenario should leave studies to review"


def test_reviewer_appends_reviews(reviewer_db):
    as_reviewer(
        reviewer_db,
        "INSERT INTO reviews (study_instance_uid, decision, reviewer, note) "
        f"VALUES ('{STUDY}', 'agree', 'alice', 'clear case')",
        commit=True,
    )
    rows = as_reviewer(reviewer_db, "SELECT decision, reviewer FROM v_latest_reviews")
    assert [tuple(r) for r in rows] == [("agree", "alice")]
    with pytest.raises(sa.exc.IntegrityError, match="ck_reviews_decision"):
        as_reviewer(
            reviewer_db,
            f"INSERT INTO reviews (study_instance_uid, decision, reviewer) "
            f"VALUES ('{STUDY}', 'meh', 'alice')",
        )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM instances",
        "SELECT * FROM studies",
        "SELECT * FROM runs",
        "SELECT * FROM image_predictions",
        "SELECT * FROM reviews",
        "UPDATE image_predictions SET score = 0",
        "UPDATE study_predictions SET label = false",
        "DELETE FROM file_outcomes",
        "UPDATE reviews SET decision = 'agree'",
        "DELETE FROM reviews",
        "INSERT INTO reviews (review_id, study_instance_uid, decision, reviewer) "
        f"VALUES (99, '{STUDY}', 'agree', 'x')",
        "INSERT INTO models (name) VALUES ('x')",
        "CREATE TABLE scratch (x int)",
        "INSERT INTO web_users (username, password_hash) VALUES ('mallory', 'x')",
        "UPDATE web_users SET password_hash = 'x'",
        "DELETE FROM web_users",
    ],
)
def test_reviewer_cannot_read_base_tables_or_change_results(reviewer_db, sql):
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        as_reviewer(reviewer_db, sql)


def test_reviewer_reads_web_users_and_records_a_disagreement_reason(reviewer_db):
    """The review web page logs in against web_users and records why a reviewer disagreed."""
    as_reviewer(reviewer_db, "SELECT username, password_hash, active FROM web_users")
    as_reviewer(
        reviewer_db,
        "INSERT INTO reviews (study_instance_uid, decision, reviewer, reason) "
        f"VALUES ('{STUDY}', 'disagree', 'bob', 'artefact')",
        commit=True,
    )
    rows = as_reviewer(reviewer_db, "SELECT decision, reason FROM v_reviews WHERE reviewer = 'bob'")
    assert [tuple(r) for r in rows] == [("disagree", "artefact")]


def test_reviewer_role_needs_postgresql(sqlite_url):
    engine = db.connect(sqlite_url)
    with pytest.raises(ValueError, match="reviewer roles need PostgreSQL"):
        db.apply_reviewer_role(engine)
    engine.dispose()
