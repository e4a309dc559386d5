"""Fixtures for the results-database tests: migrated engines and synthetic shards.

Every test that takes ``engine`` runs on a SQLite file and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from support import scratch_postgres_database

from sql import db
from sql.schema import metadata

PREPROCESSING_SHA = hashlib.sha256(b"preprocessing spec v1").hexdigest()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_metadata(version: str = "1.0.0", threshold: float = 0.5) -> dict[str, Any]:
    """The shape of model.checkpoint.Checkpoint.metadata()."""
    return {
        "format": "cxr-screen-checkpoint/1",
        "name": "cxr-screen",
        "version": version,
        "architecture": "lg_mobilenet_v2",
        "arch_kwargs": {"num_classes": 2},
        "class_names": ["normal", "abnormal"],
        "positive_class": "abnormal",
        "threshold": threshold,
        "input_size": 150,
        "preprocessing": {"input_size": 150, "window_policy": "dicom_or_percentile"},
        "preprocessing_sha256": PREPROCESSING_SHA,
        "provenance": {"seed": 0},
        "metrics": {"auc": 0.9},
        "notes": "",
    }


@dataclass
class Shard:
    instances: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "outcomes": self.outcomes,
            "predictions": self.predictions,
        }


def file_entry(
    shard: Shard,
    i: int,
    *,
    outcome: str = "predicted",
    score: float | None = None,
    study: int | None = None,
    content: str = "",
    uri: str | None = None,
    sop: str | None = None,
    threshold: float = 0.5,
    study_date: str = "20240102",
    patient_id_hash: str | None = None,
    thumbnail: bool = True,
) -> None:
    """Add file number ``i`` (two images per study unless ``study`` is given) to ``shard``."""
    uri = uri or f"file:///data/in/{i:06d}.dcm"
    study_uid = f"1.2.826.0.1.3680043.2.{study if study is not None else i // 2}"
    if outcome == "failed" and content == "unreadable":  # failed before the UIDs were read
        shard.outcomes.append({"source_uri": uri, "outcome": "failed", "reason": "not DICOM"})
        return
    sop_uid = sop or f"1.2.826.0.1.3680043.3.{i}"
    content_sha = sha(f"{sop_uid}|{content}")
    shard.instances.append(
        {
            "sop_instance_uid": sop_uid,
            "study_instance_uid": study_uid,
            "series_instance_uid": study_uid + ".1",
            "source_uri": uri,
            "content_sha256": content_sha,
            "modality": "CR" if outcome != "skipped" else "CT",
            "body_part": "CHEST",
            "view_position": "PA",
            "photometric_interpretation": "MONOCHROME2",
            "rows": 2048,
            "columns": 2048,
            "bits_stored": 12,
            "pixel_representation": 0,
            "number_of_frames": 1,
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "study_date": study_date,
            "accession_number": f"ACC{study if study is not None else i // 2:05d}",
            "patient_id_hash": patient_id_hash or sha(f"patient-{i // 4}"),
        }
    )
    entry: dict[str, Any] = {
        "source_uri": uri,
        "outcome": outcome,
        "sop_instance_uid": sop_uid,
        "study_instance_uid": study_uid,
        "facts": {"decoder": "pylibjpeg", "inverted": False, "window": [100, 4000]},
    }
    if outcome == "skipped":
        entry["reason"] = "(0008,0060) 'Modality' value 'CT' is not one of CR, DX"
    elif outcome == "failed":
        entry["reason"] = "(0028,0100) 'Bits Allocated' value of '12' is invalid"
    elif thumbnail:
        entry["thumbnail_path"] = f"thumbs/{sop_uid}.png"
    shard.outcomes.append(entry)
    if outcome == "predicted":
        value = score if score is not None else (i * 37 % 100) / 100
        shard.predictions.append(
            {
                "source_uri": uri,
                "sop_instance_uid": sop_uid,
                "score": value,
                "label": value >= threshold,
                "threshold": threshold,
                "preprocessing_sha256": PREPROCESSING_SHA,
            }
        )


def mixed_shard(start: int, stop: int) -> Shard:
    """Files start..stop-1: mostly predicted, every 7th skipped, every 11th unreadable."""
    shard = Shard()
    for i in range(start, stop):
        if i % 11 == 5:
            file_entry(shard, i, outcome="failed", content="unreadable")
        elif i % 7 == 3:
            file_entry(shard, i, outcome="skipped")
        else:
            file_entry(shard, i)
    return shard


def dump(engine: sa.Engine) -> dict[str, list[tuple]]:
    """Every row of every table, sorted, for before/after comparisons."""
    out = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            rows = conn.execute(sa.select(table)).fetchall()
            out[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return out


@pytest.fixture(scope="module")
def _module_engine(module_db_url) -> Iterator[sa.Engine]:
    eng = db.connect(module_db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def engine(_module_engine) -> sa.Engine:
    """A migrated, empty database: SQLite and PostgreSQL, one per test module, emptied before
    each test (creating a PostgreSQL database per test costs seconds on a busy machine; the
    migration tests use fresh ``db_url`` databases)."""
    with _module_engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            names = ", ".join(t.name for t in metadata.sorted_tables)
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        else:
            for table in reversed(metadata.sorted_tables):
                conn.execute(table.delete())
    return _module_engine


@pytest.fixture
def Session(engine):
    return db.session_factory(engine)


@pytest.fixture
def model_run(Session) -> tuple[int, int]:
    """A registered model version and a running run."""
    from sql import runs

    with Session.begin() as session:
        model_id = runs.register_model(session, model_metadata(), sha("checkpoint v1"))
        run_id = runs.start_run(session, kind="reprocess", source="/data/in", model_id=model_id)
    return model_id, run_id


UTC = dt.UTC


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_db_url(request, tmp_path_factory) -> Iterator[str]:
    """Like the ``db_url`` fixture, but one database per test module (for read-only tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'results.db'}"
        return
    with scratch_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def module_pg_url() -> Iterator[str]:
    """One fresh PostgreSQL database per test module."""
    with scratch_postgres_database() as url:
        yield url
