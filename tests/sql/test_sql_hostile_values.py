"""Hostile values at the writer: every stored string is safe on both databases, and a file whose
values are still refused fails alone while the rest of its shard is stored."""

from __future__ import annotations

import json
import math

import pytest
import sqlalchemy as sa
from conftest import Shard, dump, file_entry, mixed_shard, model_metadata, sha

from sql import db, predictions, rows, runs, shards
from sql.schema import FileOutcome, Instance

ACCESSION = "ACC\x00NUL\x07BEL\x1bESC\x85NEL\ud800"


def write(Session, run_id, model_id, shard: Shard, force=False) -> shards.ShardResult:
    with Session.begin() as session:
        result = shards.write_shard(
            session, run_id=run_id, model_id=model_id, force=force, **shard.kwargs()
        )
        predictions.upsert_study_predictions(
            session, model_id, run_id, study_uids=result.study_uids, force=force
        )
    return result


def outcomes(engine) -> dict[str, dict]:
    table = FileOutcome.__table__
    with engine.connect() as conn:
        return {r["source_uri"]: dict(r) for r in conn.execute(sa.select(table)).mappings()}


def hostile_shard() -> Shard:
    """Three files: NUL and control characters in header facts, a reason and facts (with NaN
    and infinities, a 100k-character string, a NUL key), a control character in a URI."""
    shard = Shard()
    file_entry(shard, 0)
    file_entry(shard, 1, outcome="skipped")
    file_entry(shard, 2, uri="file:///data/in/\x1bodd\x00name.dcm")
    shard.instances[0].update(
        accession_number=ACCESSION, modality="CR\x00", body_part="CHEST\n\tPA", rows=2048.0
    )
    shard.outcomes[0]["facts"] = {
        "window": {"center": math.nan, "width": math.inf, "function": "LINEAR\x00EXACT"},
        "voi_lut_function": "SIGMOID\x00",
        "bits\x00": [-math.inf, 2**80, "x" * 100_000],
        "deep": _nested(40),
    }
    shard.outcomes[1]["reason"] = "(0008,0060) 'Modality' value 'C\x00T' is not one of CR, DX"
    return shard


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"next": value}
    return value


def test_every_stored_string_is_made_safe_on_both_databases(Session, engine, model_run):
    model_id, run_id = model_run
    result = write(Session, run_id, model_id, hostile_shard())
    assert result.refused == ()
    assert result.outcome_counts == {"predicted": 2, "skipped": 1, "failed": 0}

    with engine.connect() as conn:
        instance = (
            conn.execute(
                sa.select(Instance.__table__).where(
                    Instance.__table__.c.source_uri == "file:///data/in/000000.dcm"
                )
            )
            .mappings()
            .one()
        )
    assert instance["accession_number"] == "ACC\\x00NUL\\x07BEL\\x1bESC\\x85NEL\\ud800"
    assert instance["modality"] == "CR"  # trailing NUL padding dropped
    assert instance["body_part"] == "CHEST  PA"
    assert instance["rows"] == 2048

    stored = outcomes(engine)
    assert "file:///data/in/\\x1bodd\\x00name.dcm" in stored
    facts = stored["file:///data/in/000000.dcm"]["facts"]
    assert facts["window"] == {"center": "nan", "function": "LINEAR\\x00EXACT", "width": "inf"}
    assert facts["voi_lut_function"] == "SIGMOID"
    bits = facts["bits"]
    assert bits[:2] == ["-inf", "integer of 81 bits"]
    assert len(bits[2]) == rows.TEXT_LIMITS["fact"] and bits[2].endswith("\u2026")
    assert json.dumps(facts).count("next") == rows.FACTS_MAX_DEPTH - 1
    reason = stored["file:///data/in/000001.dcm"]["reason"]
    assert reason == "(0008,0060) 'Modality' value 'C\\x00T' is not one of CR, DX"
    every = json.dumps(dump(engine), default=str)
    assert "\\u0000" not in every and "\x00" not in every


def test_long_keys_stay_distinct_and_long_text_is_capped(Session, engine, model_run):
    model_id, run_id = model_run
    shard = Shard()
    long_dir = "file:///" + "d" * 3000
    file_entry(shard, 0, uri=f"{long_dir}/a.dcm", outcome="failed")
    file_entry(shard, 1, uri=f"{long_dir}/b.dcm", outcome="failed")
    shard.outcomes[0]["reason"] = "r" * 50_000
    write(Session, run_id, model_id, shard)
    stored = outcomes(engine)
    assert len(stored) == 2
    assert all(len(uri) <= rows.TEXT_LIMITS["key"] for uri in stored)
    reasons = [o["reason"] for o in stored.values()]
    assert max(len(r) for r in reasons) == rows.TEXT_LIMITS["text"]


def without_sanitiser(monkeypatch) -> None:
    """The writer's text and JSON cleaning off, as if a value slipped past it."""
    monkeypatch.setattr(rows, "clean_text", lambda value, limit, *, key=False: value)
    monkeypatch.setattr(rows, "clean_json", lambda value, depth=0, *, max_items=0: value)


def test_without_the_sanitiser_postgresql_refuses_and_only_that_file_fails(pg_url, monkeypatch):
    """The reported failure: a NUL in AccessionNumber (a column) or VOILUTFunction (facts)
    ended the whole PostgreSQL run. Now each such file is failed, named by its column and tag,
    and the rest of the shard is stored."""
    engine = db.connect(pg_url)
    try:
        Session = db.session_factory(engine)
        with Session.begin() as session:
            model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
            run_id = runs.start_run(session, kind="reprocess", model_id=model_id)
        without_sanitiser(monkeypatch)
        shard = mixed_shard(0, 40)
        by_uri = {d["source_uri"]: d for d in [*shard.instances, *shard.outcomes] if "rows" in d}
        by_uri["file:///data/in/000004.dcm"].update(accession_number="ACC\x00NUL")
        shard.outcomes[20]["facts"] = {"voi_lut_function": "LINEAR\x00"}  # file 20
        shard.outcomes[30]["facts"] = {"window": {"width": math.nan}}  # file 30
        result = write(Session, run_id, model_id, shard)
        refused = {r["source_uri"]: r["reason"] for r in result.refused}
        assert set(refused) == {f"file:///data/in/{i:06d}.dcm" for i in (4, 20, 30)}
        assert (
            "instances.accession_number ((0008,0050) 'Accession Number')"
            in (refused["file:///data/in/000004.dcm"])
        )
        assert "NUL" in refused["file:///data/in/000004.dcm"]
        assert "file_outcomes.facts" in refused["file:///data/in/000020.dcm"]
        assert "not a finite number" in refused["file:///data/in/000030.dcm"]
        assert all("ACC" not in r and "LINEAR" not in r for r in refused.values())
        assert sum(result.outcome_counts.values()) == 40
        stored = outcomes(engine)
        assert len(stored) == 40
        assert {u for u, o in stored.items() if o["reason"] in refused.values()} == set(refused)
        assert all(stored[u]["outcome"] == "failed" for u in refused)
        assert (
            sum(o["outcome"] == "predicted" for o in stored.values())
            == (result.outcome_counts["predicted"])
        )
    finally:
        engine.dispose()


def test_a_value_that_breaks_a_check_constraint_fails_only_its_file(
    Session, engine, model_run, monkeypatch
):
    """A row check that lets a bad row through (a skipped file without a reason) meets the
    table's CHECK constraint on both databases: that file fails, the shard is stored."""
    model_id, run_id = model_run
    bad = "file:///data/in/000010.dcm"
    checked = shards.outcome_rows

    def leaky(items):
        out = checked(items)
        for row in out:
            if row["source_uri"] == bad and row["outcome"] == "skipped":
                row["reason"] = None
        return out

    monkeypatch.setattr(shards, "outcome_rows", leaky)
    shard = mixed_shard(0, 24)  # file 10 is skipped
    result = write(Session, run_id, model_id, shard)
    assert [r["source_uri"] for r in result.refused] == [bad]
    assert "ck_file_outcomes_reason_required" in result.refused[0]["reason"]
    assert sum(result.outcome_counts.values()) == 24
    stored = outcomes(engine)
    assert len(stored) == 24 and stored[bad]["outcome"] == "failed"

    # The same shard again changes nothing (the refused file's row included).
    before = dump(engine)
    again = write(Session, run_id, model_id, shard)
    assert again.outcome_counts == result.outcome_counts
    assert dump(engine) == before


def test_a_lost_connection_is_not_taken_for_bad_data(Session, engine, model_run, monkeypatch):
    model_id, run_id = model_run

    def drop(*_args, **_kwargs):
        raise sa.exc.OperationalError(
            "INSERT", {}, Exception("server closed the connection unexpectedly")
        )

    monkeypatch.setattr(shards, "_upsert_file_outcomes", drop)
    with pytest.raises(sa.exc.OperationalError, match="server closed"):
        write(Session, run_id, model_id, mixed_shard(0, 8))
    assert outcomes(engine) == {}


def test_a_missing_column_stops_the_write_instead_of_failing_files(db_url):
    engine = db.connect(db_url)
    try:
        Session = db.session_factory(engine)
        with Session.begin() as session:
            model_id = runs.register_model(session, model_metadata(), sha("ckpt"))
            run_id = runs.start_run(session, kind="reprocess", model_id=model_id)
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE instances DROP COLUMN bits_stored")
        with pytest.raises(sa.exc.DBAPIError, match="bits_stored"):
            write(Session, run_id, model_id, mixed_shard(0, 8))
        assert outcomes(engine) == {}
    finally:
        engine.dispose()


def test_bisection_finds_each_bad_file_of_a_large_shard(Session, engine, model_run):
    model_id, run_id = model_run
    shard = mixed_shard(0, 200)
    bad = {7, 120, 121, 199}
    for item in shard.instances:
        index = int(item["source_uri"][-10:-4])
        if index in bad:
            item["rows"] = -(2**40)
    result = write(Session, run_id, model_id, shard)
    refused = {int(r["source_uri"][-10:-4]) for r in result.refused}
    assert refused == {i for i in bad if i % 11 != 5}  # the unreadable ones have no header
    assert all("(0028,0010) 'Rows'" in r["reason"] for r in result.refused)
    assert sum(result.outcome_counts.values()) == 200
    assert len(outcomes(engine)) == 200
