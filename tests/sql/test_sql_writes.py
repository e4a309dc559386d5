"""Writes on both databases: idempotency, force, UID conflicts, validation, runs, reviews."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter

import pytest
import sqlalchemy as sa
from conftest import (
    PREPROCESSING_SHA,
    Shard,
    dump,
    file_entry,
    mixed_shard,
    model_metadata,
    sha,
)

from sql import integrity, predictions, reviews, runs, shards, upsert
from sql import rows as row_checks
from sql.schema import Model, Run


@pytest.fixture(params=["statements", "copy"])
def bulk_path(request, monkeypatch) -> str:
    """Run a test through plain INSERT ... ON CONFLICT and through the COPY staging path
    (on PostgreSQL; SQLite has one path)."""
    if request.param == "copy":
        monkeypatch.setattr(upsert, "COPY_THRESHOLD", 1)
    return request.param


def write(Session, run_id, model_id, shard: Shard, force=False):
    with Session.begin() as session:
        result = shards.write_shard(
            session, run_id=run_id, model_id=model_id, force=force, **shard.kwargs()
        )
        predictions.upsert_study_predictions(
            session, model_id, run_id, study_uids=result.study_uids, force=force
        )
    return result


def count(engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


def new_run(Session, model_id, kind="reprocess") -> int:
    with Session.begin() as session:
        return runs.start_run(session, kind=kind, source="/data/in", model_id=model_id)


# --- models and runs --------------------------------------------------------------------------


def test_register_model_is_idempotent_on_sha256(Session, engine):
    with Session.begin() as session:
        first = runs.register_model(session, model_metadata(), sha("ckpt"))
        again = runs.register_model(session, model_metadata(), sha("ckpt"))
        other = runs.register_model(session, model_metadata("2.0.0"), sha("ckpt2"))
    assert first == again != other
    with engine.connect() as conn:
        models = Model.__table__
        row = conn.execute(sa.select(models).where(models.c.model_id == first)).mappings().one()
    assert row["name"] == "cxr-screen" and row["version"] == "1.0.0"
    assert row["class_names"] == ["normal", "abnormal"]
    assert row["preprocessing_sha256"] == PREPROCESSING_SHA
    assert row["checkpoint_metadata"]["metrics"] == {"auc": 0.9}


def test_register_model_refuses_a_second_checkpoint_under_the_same_version(Session):
    with Session.begin() as session:
        runs.register_model(session, model_metadata(), sha("ckpt"))
    with pytest.raises(ValueError, match="give it a new version"), Session.begin() as session:
        runs.register_model(session, model_metadata(), sha("retrained"))
    meta = model_metadata()
    del meta["threshold"]
    with pytest.raises(ValueError, match="threshold"), Session.begin() as session:
        runs.register_model(session, meta, sha("other"))
    with pytest.raises(ValueError, match="64 lowercase hex"), Session.begin() as session:
        runs.register_model(session, model_metadata("3"), "not-a-hash")


def test_runs_start_and_finish_with_conserved_counts(Session, engine, model_run):
    _, run_id = model_run
    with pytest.raises(ValueError, match="saw 10 files but counts 9"), Session.begin() as session:
        runs.finish_run(
            session,
            run_id,
            "completed",
            {"files_seen": 10, "predicted": 7, "skipped": 1, "failed": 1},
        )
    with pytest.raises(ValueError, match="missing"), Session.begin() as session:
        runs.finish_run(session, run_id, "completed", {"files_seen": 0})
    with Session.begin() as session:
        runs.finish_run(
            session,
            run_id,
            "completed",
            {"files_seen": 10, "predicted": 7, "skipped": 2, "failed": 1},
        )
    with pytest.raises(ValueError, match="already completed"), Session.begin() as session:
        runs.finish_run(
            session, run_id, "failed", {"files_seen": 0, "predicted": 0, "skipped": 0, "failed": 0}
        )
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM v_run_summary")).mappings().one()
    assert (row["status"], row["files_seen"], row["predicted"], row["skipped"]) == (
        "completed",
        10,
        7,
        2,
    )
    assert row["finished_at"] is not None and row["model_version"] == "1.0.0"
    with pytest.raises(ValueError, match="run kind 'weekly'"), Session.begin() as session:
        runs.start_run(session, kind="weekly")


def test_a_failed_run_keeps_partial_counts_and_its_error(Session, engine, model_run):
    _, run_id = model_run
    with Session.begin() as session:
        runs.finish_run(
            session,
            run_id,
            "failed",
            {"files_seen": 10, "predicted": 3, "skipped": 0, "failed": 0},
            error="worker died",
        )
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT status, error FROM runs")).one()
    assert tuple(row) == ("failed", "worker died")


# --- shards ---------------------------------------------------------------------------------


def test_the_same_shard_twice_leaves_every_table_unchanged(Session, engine, model_run, bulk_path):
    model_id, run_id = model_run
    shard = mixed_shard(0, 60)
    first = write(Session, run_id, model_id, shard)
    before = dump(engine)
    # A later run writing the same input (no --force) changes nothing, not even run ids.
    rerun = new_run(Session, model_id)
    again = write(Session, rerun, model_id, shard)
    after = dump(engine)
    after["runs"] = [r for r in after["runs"] if r[0] != rerun]
    assert after == before
    expected = Counter(o["outcome"] for o in shard.outcomes)
    assert first.outcome_counts == again.outcome_counts == dict(expected)
    assert min(expected.values()) > 0
    assert count(engine, "file_outcomes") == 60
    with engine.connect() as conn:
        run_ids = conn.execute(sa.text("SELECT DISTINCT run_id FROM file_outcomes")).scalars()
        assert set(run_ids) == {run_id}
    with Session.begin() as session:
        assert all(v == 0 for v in integrity.check_integrity(session).values())


def test_force_updates_in_place_and_keeps_the_row_count(Session, engine, model_run, bulk_path):
    model_id, run_id = model_run
    write(Session, run_id, model_id, mixed_shard(0, 40))
    counts = {t: count(engine, t) for t in dump(engine)}

    changed = Shard()
    for i in range(40):
        if i % 11 == 5:
            file_entry(changed, i, outcome="failed", content="unreadable")
        elif i % 7 == 3:
            file_entry(changed, i, outcome="skipped")
        else:
            file_entry(changed, i, score=0.99)  # every image is now strongly positive
    forced = new_run(Session, model_id)
    write(Session, forced, model_id, changed, force=True)

    assert {t: count(engine, t) for t in counts if t != "runs"} == {
        t: n for t, n in counts.items() if t != "runs"
    }
    with engine.connect() as conn:
        preds = conn.execute(sa.text("SELECT score, label, run_id FROM image_predictions")).all()
        studies = conn.execute(sa.text("SELECT score, label, run_id FROM study_predictions")).all()
        outcome_runs = conn.execute(sa.text("SELECT DISTINCT run_id FROM file_outcomes")).all()
    assert {tuple(p) for p in preds} == {(0.99, True, forced)}
    assert {(s[0], bool(s[1]), s[2]) for s in studies} == {(0.99, True, forced)}
    assert outcome_runs == [(forced,)]


def test_a_changed_outcome_is_updated_without_force(Session, engine, model_run):
    model_id, run_id = model_run
    shard = Shard()
    file_entry(shard, 0, outcome="failed")  # e.g. a decoder was missing
    write(Session, run_id, model_id, shard)
    fixed = Shard()
    file_entry(fixed, 0, score=0.8)
    rerun = new_run(Session, model_id)
    result = write(Session, rerun, model_id, fixed)
    assert result.outcome_counts["predicted"] == 1
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT outcome, reason, run_id FROM file_outcomes")).one()
    assert tuple(row) == ("predicted", None, rerun)
    assert count(engine, "image_predictions") == 1


def test_uid_seen_with_other_content_is_recorded_not_merged(Session, engine, model_run, bulk_path):
    model_id, run_id = model_run
    original = Shard()
    file_entry(original, 0, score=0.1, uri="file:///a/original.dcm")
    write(Session, run_id, model_id, original)
    before_instance = dump(engine)["instances"]

    clash = Shard()  # same SOP Instance UID, different bytes, elsewhere
    file_entry(clash, 0, score=0.9, uri="file:///b/impostor.dcm", content="other pixels")
    file_entry(clash, 1, score=0.3)
    run2 = new_run(Session, model_id)
    result = write(Session, run2, model_id, clash)

    assert result.outcome_counts == {"predicted": 1, "skipped": 0, "failed": 1}
    assert [c["new_source_uri"] for c in result.conflicts] == ["file:///b/impostor.dcm"]
    after = dump(engine)
    assert [r for r in after["instances"] if r[0] == "1.2.826.0.1.3680043.3.0"] == [
        r for r in before_instance if r[0] == "1.2.826.0.1.3680043.3.0"
    ]
    with engine.connect() as conn:
        conflict = conn.execute(sa.text("SELECT * FROM uid_conflicts")).mappings().one()
        outcome = conn.execute(
            sa.text("SELECT outcome, reason FROM file_outcomes WHERE source_uri = :u"),
            {"u": "file:///b/impostor.dcm"},
        ).one()
        score = conn.execute(
            sa.text("SELECT score FROM image_predictions WHERE sop_instance_uid = :s"),
            {"s": "1.2.826.0.1.3680043.3.0"},
        ).scalar_one()
    assert conflict["existing_source_uri"] == "file:///a/original.dcm"
    assert conflict["new_content_sha256"] == sha("1.2.826.0.1.3680043.3.0|other pixels")
    assert conflict["run_id"] == run2
    assert outcome[0] == "failed"
    assert "file:///a/original.dcm" in outcome[1] and "file:///b/impostor.dcm" in outcome[1]
    assert score == 0.1  # the original's prediction stands

    # Seeing the impostor again records nothing new.
    write(Session, new_run(Session, model_id), model_id, clash)
    assert count(engine, "uid_conflicts") == 1


def test_uid_conflict_inside_one_shard(Session, engine, model_run):
    model_id, run_id = model_run
    shard = Shard()
    file_entry(shard, 0, score=0.2, uri="file:///x/first.dcm")
    file_entry(shard, 0, score=0.7, uri="file:///x/second.dcm", content="different")
    file_entry(shard, 0, score=0.2, uri="file:///x/copy-of-first.dcm")  # same bytes: a copy
    result = write(Session, run_id, model_id, shard)
    assert result.outcome_counts == {"predicted": 1, "skipped": 1, "failed": 1}
    assert [c["new_source_uri"] for c in result.conflicts] == ["file:///x/second.dcm"]
    assert [d["source_uri"] for d in result.duplicates] == ["file:///x/copy-of-first.dcm"]
    assert count(engine, "instances") == 1
    assert count(engine, "image_predictions") == 1


def test_two_copies_of_one_image_are_one_prediction_and_two_outcomes(Session, engine, model_run):
    model_id, run_id = model_run
    shard = Shard()
    file_entry(shard, 0, score=0.4, uri="file:///x/a.dcm")
    file_entry(shard, 0, score=0.4, uri="file:///x/b.dcm")
    write(Session, run_id, model_id, shard)
    assert count(engine, "image_predictions") == 1
    assert count(engine, "file_outcomes") == 2
    assert count(engine, "uid_conflicts") == 0
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT source_uri, outcome FROM file_outcomes")).all())
    assert rows == {"file:///x/a.dcm": "predicted", "file:///x/b.dcm": "skipped"}


# Each mutation breaks one file (file 0, or file 1 where the index says so); the others are
# stored, and the broken one is recorded failed with a reason that says why.
INVALID = [
    (lambda s: s.instances[0].update(patient_name="DOE^JANE"), "unknown key.*patient_name", 0),
    (lambda s: s.instances[0].update(content_sha256="abc"), "content_sha256", 0),
    (lambda s: s.instances[0].update(study_date="2024-13-45"), r"\(0008,0020\)", 0),
    (lambda s: s.instances[0].update(rows="many"), r"instances.rows \(\(0028,0010\) 'Rows'\)", 0),
    (lambda s: s.instances[0].update(rows=2**40), r"integer from -2147483648 to 2147483647", 0),
    (lambda s: s.instances[0].update(modality=["CR", "DX"]), "must be text, got a list", 0),
    (lambda s: s.outcomes[1].update(reason=None), "'skipped' of .* needs a reason", 1),
    (lambda s: s.outcomes[0].update(outcome="done"), "'done' of .* is not one of", 0),
    (lambda s: s.predictions[0].update(score=1.5), r"score of .* in \[0, 1\]", 0),
    (lambda s: s.predictions[0].update(score=float("nan")), r"in \[0, 1\]", 0),
    (lambda s: s.predictions[0].update(label=1), "label of .* must be a bool", 0),
    (lambda s: s.predictions.pop(0), "has no prediction", 0),
    (lambda s: s.instances.pop(0), "has no instance", 0),
    (lambda s: s.outcomes.append(dict(s.outcomes[0])), "appears twice", 0),
]


def test_the_row_checks_refuse_bad_values_with_the_reason():
    for mutate, message, _ in INVALID[:6]:
        shard = Shard()
        file_entry(shard, 0)
        mutate(shard)
        with pytest.raises(ValueError, match=message):
            row_checks.instance_rows(shard.instances)
    shard = Shard()
    file_entry(shard, 0)
    shard.outcomes[0]["facts"] = {"window": {"nested": {"Patient_Name": "x"}}}
    with pytest.raises(row_checks.RowValueError, match="'Patient_Name'") as raised:
        row_checks.outcome_rows(shard.outcomes)
    assert raised.value.column == "file_outcomes.facts" and "x" not in raised.value.rule


def test_a_file_with_bad_values_is_failed_and_the_rest_of_the_shard_stored(
    Session, engine, model_run
):
    model_id, run_id = model_run
    for mutate, message, broken in INVALID:  # one database for all cases: they are many
        with engine.begin() as conn:
            for table in ("study_predictions", "file_outcomes", "image_predictions", "instances"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
        shard = Shard()
        file_entry(shard, 0)
        file_entry(shard, 1, outcome="skipped")
        file_entry(shard, 2, score=0.3)
        mutate(shard)
        result = write(Session, run_id, model_id, shard)
        uri = f"file:///data/in/{broken:06d}.dcm"
        assert [r["source_uri"] for r in result.refused] == [uri], message
        assert re.search(message, result.refused[0]["reason"]), result.refused[0]["reason"]
        assert result.refused[0]["reason"].startswith("not stored: the results database refused")
        assert sum(result.outcome_counts.values()) == 3, message
        assert result.outcome_counts["failed"] == 1, message
        with engine.connect() as conn:
            outcomes = dict(
                conn.execute(sa.text("SELECT source_uri, outcome FROM file_outcomes")).all()
            )
        assert outcomes[uri] == "failed", message
        assert outcomes["file:///data/in/000002.dcm"] == "predicted", message
        assert len(outcomes) == 3, message


def test_write_shard_checks_the_model_and_run_exist(Session, model_run):
    model_id, run_id = model_run
    with pytest.raises(ValueError, match="run_id .*999"), Session.begin() as session:
        shards.write_shard(session, run_id=999, model_id=model_id, **mixed_shard(0, 2).kwargs())
    with pytest.raises(ValueError, match="model_id .*999"), Session.begin() as session:
        shards.write_shard(session, run_id=run_id, model_id=999, **mixed_shard(0, 2).kwargs())


def test_upsert_image_predictions_refuses_orphans(Session, model_run, bulk_path):
    model_id, run_id = model_run
    row = {
        "sop_instance_uid": "1.2.3",
        "model_id": model_id,
        "study_instance_uid": "1.2",
        "score": 0.5,
        "label": True,
        "threshold": 0.5,
        "preprocessing_sha256": PREPROCESSING_SHA,
        "run_id": run_id,
        "predicted_at": dt.datetime.now(dt.UTC),
    }
    with pytest.raises(ValueError, match="1.2.3 .*no matching"), Session.begin() as session:
        predictions.upsert_image_predictions(session, [row])


# --- study predictions, planner lookup --------------------------------------------------------


def test_study_predictions_aggregate_images_in_sql(Session, engine, model_run):
    model_id, run_id = model_run
    shard = Shard()
    file_entry(shard, 0, study=7, score=0.2)
    file_entry(shard, 1, study=7, score=0.6)
    file_entry(shard, 2, study=7, score=0.4)
    file_entry(shard, 3, study=8, score=0.1)
    write(Session, run_id, model_id, shard)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT study_instance_uid, aggregation, n_images, score, label, threshold "
                "FROM study_predictions ORDER BY study_instance_uid"
            )
        ).all()
    assert [(r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows] == [
        ("max", 3, 0.6, True, 0.5),
        ("max", 1, 0.1, False, 0.5),
    ]
    with Session.begin() as session:
        predictions.upsert_study_predictions(session, model_id, run_id, rule="mean", threshold=0.45)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT aggregation, score, label FROM study_predictions WHERE n_images = 3")
        ).one()
    assert row[0] == "mean" and row[1] == pytest.approx(0.4) and not row[2]
    with pytest.raises(ValueError, match="'median'"), Session.begin() as session:
        predictions.upsert_study_predictions(session, model_id, run_id, rule="median")


def test_predicted_sop_uids_is_the_planners_already_done(Session, model_run):
    model_id, run_id = model_run
    write(Session, run_id, model_id, mixed_shard(0, 20))
    asked = [f"1.2.826.0.1.3680043.3.{i}" for i in range(0, 30)]
    with Session.begin() as session:
        done = predictions.predicted_sop_uids(session, model_id, asked)
        other_model = runs.register_model(session, model_metadata("2"), sha("v2"))
        assert predictions.predicted_sop_uids(session, other_model, asked) == set()
    expected = {f"1.2.826.0.1.3680043.3.{i}" for i in range(20) if i % 11 != 5 and i % 7 != 3}
    assert done == expected


# --- reviews and watermarks -------------------------------------------------------------------


def test_reviews_are_appended_and_the_latest_counts(Session, engine, model_run):
    model_id, run_id = model_run
    write(Session, run_id, model_id, mixed_shard(0, 4))
    study = "1.2.826.0.1.3680043.2.0"
    t0 = dt.datetime(2024, 1, 2, 8, tzinfo=dt.UTC)
    with Session.begin() as session:
        reviews.add_review(
            session, study_instance_uid=study, decision="disagree", reviewer="bob", created_at=t0
        )
        reviews.add_review(
            session,
            study_instance_uid=study,
            decision="agree",
            reviewer="bob",
            note="on second look",
            model_id=model_id,
            created_at=t0 + dt.timedelta(hours=1),
        )
    with engine.connect() as conn:
        latest = conn.execute(sa.text("SELECT * FROM v_latest_reviews")).mappings().all()
    assert [(r["decision"], r["note"], r["model_version"]) for r in latest] == [
        ("agree", "on second look", "1.0.0")
    ]
    assert count(engine, "reviews") == 2
    with pytest.raises(ValueError, match="not in the database"), Session.begin() as session:
        reviews.add_review(session, study_instance_uid="9.9", decision="agree", reviewer="x")
    with pytest.raises(ValueError, match="'maybe'"), Session.begin() as session:
        reviews.add_review(session, study_instance_uid=study, decision="maybe", reviewer="x")


def test_watermarks_round_trip_in_utc(Session, model_run):
    _, run_id = model_run
    with Session.begin() as session:
        assert runs.get_watermark(session, "nightly") is None
        local = dt.timezone(dt.timedelta(hours=2))
        runs.set_watermark(
            session, "nightly", dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=local), {"files": 3}
        )
        runs.set_watermark(
            session,
            "nightly",
            dt.datetime(2024, 1, 3, 3, 4, 5, 123456, tzinfo=local),
            {"files": 4},
            run_id=run_id,
        )
    with Session.begin() as session:
        mark = runs.get_watermark(session, "nightly")
        with pytest.raises(ValueError, match="timezone-aware"):
            runs.set_watermark(session, "nightly", dt.datetime(2024, 1, 1))
    assert mark.value == dt.datetime(2024, 1, 3, 1, 4, 5, 123456, tzinfo=dt.UTC)
    assert mark.value.tzinfo is not None and mark.detail == {"files": 4}
    assert mark.run_id == run_id


def test_timestamps_come_back_aware_utc(Session, model_run):
    _, run_id = model_run
    with Session.begin() as session:
        started = session.execute(
            sa.select(Run.__table__.c.started_at).where(Run.__table__.c.run_id == run_id)
        ).scalar_one()
    assert started.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - started) < dt.timedelta(minutes=5)


def test_facts_in_another_key_order_are_the_same_facts(Session, engine, model_run):
    model_id, run_id = model_run
    shard = mixed_shard(0, 8)
    write(Session, run_id, model_id, shard)
    before = dump(engine)
    for outcome in shard.outcomes:
        if "facts" in outcome:
            outcome["facts"] = dict(reversed(list(outcome["facts"].items())))
    write(Session, new_run(Session, model_id), model_id, shard)
    after = dump(engine)
    assert after["file_outcomes"] == before["file_outcomes"]
