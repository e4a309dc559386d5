"""PHI: no table ever holds a raw patient identifier or name; only keyed hashes."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re

import pytest
import sqlalchemy as sa
from conftest import Shard, file_entry

from sql import predictions, reviews, runs, shards
from sql import rows as row_checks
from sql.schema import metadata

RAW_ID = "PID-0048812-X"
RAW_NAME = "DOE^JANE^Q"
KEY = b"site secret"


def keyed_hash(value: str) -> str:
    return hmac.new(KEY, value.encode(), hashlib.sha256).hexdigest()


def planted_shard() -> Shard:
    shard = Shard()
    for i in range(6):
        file_entry(shard, i, patient_id_hash=keyed_hash(RAW_ID))
    file_entry(shard, 6, outcome="skipped", patient_id_hash=keyed_hash(RAW_ID))
    return shard


PLANTED = [
    (lambda s: s.instances[0].update(patient_id=RAW_ID), "unknown key.*patient_id"),
    (lambda s: s.instances[0].update(patient_name=RAW_NAME), "unknown key.*patient_name"),
    (lambda s: s.instances[0].update(patient_id_hash=RAW_ID), "instances.patient_id_hash"),
    (lambda s: s.instances[0].update(patient_id_hash=RAW_ID.lower() * 5), "keyed hash"),
    (lambda s: s.outcomes[0]["facts"].update(PatientID=RAW_ID), "names patient data"),
    (
        lambda s: s.outcomes[0]["facts"].update(header={"patient": {"name": RAW_NAME}}),
        "names patient data",
    ),
]


def test_raw_patient_data_is_refused_and_never_echoed(Session, engine, model_run):
    """The file that carries it is recorded failed (the rest of the shard is stored); neither
    the reason nor the row checks' error repeats the value."""
    model_id, run_id = model_run
    for plant, message in PLANTED:
        shard = planted_shard()
        plant(shard)
        with Session.begin() as session:
            result = shards.write_shard(session, run_id=run_id, model_id=model_id, **shard.kwargs())
        assert [r["source_uri"] for r in result.refused] == ["file:///data/in/000000.dcm"]
        reason = result.refused[0]["reason"]
        assert re.search(message, reason), reason
        assert RAW_ID not in reason and RAW_NAME not in reason
        assert result.outcome_counts == {"predicted": 5, "skipped": 1, "failed": 1}
        with pytest.raises(ValueError) as raised:
            row_checks.instance_rows(shard.instances)
            row_checks.outcome_rows(shard.outcomes)
        assert RAW_ID not in str(raised.value) and RAW_NAME not in str(raised.value)
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT COUNT(*) FROM instances WHERE source_uri = :u"),
            {"u": "file:///data/in/000000.dcm"},
        ).scalar_one()
    assert stored == 0


def test_no_table_holds_a_raw_patient_identifier(Session, engine, model_run):
    model_id, run_id = model_run
    with Session.begin() as session:
        result = shards.write_shard(
            session, run_id=run_id, model_id=model_id, **planted_shard().kwargs()
        )
        predictions.upsert_study_predictions(
            session, model_id, run_id, study_uids=result.study_uids
        )
        reviews.add_review(
            session,
            study_instance_uid="1.2.826.0.1.3680043.2.0",
            decision="agree",
            reviewer="alice",
        )
        runs.set_watermark(session, "nightly", dt.datetime.now(dt.UTC), {"files": 7})
        runs.finish_run(
            session,
            run_id,
            "completed",
            {"files_seen": 7, "predicted": 6, "skipped": 1, "failed": 0},
        )
    # Every refused attempt above has rolled back; now grep every column of every table.
    inspector = sa.inspect(engine)
    tables = inspector.get_table_names()
    assert set(metadata.tables) <= set(tables)
    found_hash = False
    with engine.connect() as conn:
        for table in tables:
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                text = " ".join(str(v) for v in row)
                assert RAW_ID not in text and RAW_NAME not in text, table
                assert RAW_ID.lower() not in text.lower(), table
                found_hash |= keyed_hash(RAW_ID) in text
    assert found_hash, "the keyed hash should be stored"


def test_only_hash_columns_mention_patients():
    patient_columns = {
        f"{table.name}.{column.name}"
        for table in metadata.sorted_tables
        for column in table.columns
        if "patient" in column.name
    }
    assert patient_columns == {"studies.patient_id_hash", "instances.patient_id_hash"}
