"""One shard of screening results in one transaction: instances, studies, UID conflicts, image
predictions and one outcome per file, then the run's heartbeat.

The caller owns the transaction (one per shard)::

    with Session.begin() as session:
        result = write_shard(session, run_id=..., model_id=..., instances=..., outcomes=...,
                             predictions=..., force=False)
        upsert_study_predictions(session, model_id, run_id, study_uids=result.study_uids)

Every row write is an ``INSERT ... ON CONFLICT`` keyed by DICOM UIDs (or the source URI) plus
the model version (``sql.upsert``). Without ``force`` a conflicting row is only updated when a
value actually differs, so writing the same shard twice leaves every row (``run_id`` and
timestamps included) unchanged; with ``force`` rows are overwritten in place (same keys, same
row count). The dicts are described by ``sql.rows.INSTANCE_KEYS``, ``OUTCOME_KEYS`` and
``PREDICTION_KEYS``.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql.predictions import upsert_image_predictions
from sql.rows import INSTANCE_KEYS, instance_rows, outcome_rows, prediction_rows
from sql.runs import heartbeat, require_models_and_runs
from sql.schema import OUTCOMES, FileOutcome, Instance, Study, UidConflict
from sql.upsert import member_of, on_conflict, upsert_rows, utc_now

_STUDY_FACTS = ("accession_number", "study_date", "patient_id_hash")
_CONFLICT_KEYS = ["sop_instance_uid", "new_source_uri", "new_content_sha256"]
_OUTCOME_COMPARE = [
    "sop_instance_uid",
    "study_instance_uid",
    "content_sha256",
    "outcome",
    "reason",
    "facts",
    "thumbnail_path",
]


@dataclass(frozen=True)
class ShardResult:
    """What ``write_shard`` stored.

    outcome_counts: files per final outcome (a UID conflict turns a file into ``failed``).
    conflicts: one dict per file whose SOP Instance UID was already stored with other content.
    study_uids: studies with a prediction in this shard (feed to ``upsert_study_predictions``).
    """

    outcome_counts: dict[str, int]
    conflicts: tuple[dict[str, str], ...]
    predictions_written: int
    study_uids: frozenset[str]


@dataclass
class _Comparison:
    """The shard's files against the stored instances."""

    matching: list[dict[str, Any]] = field(default_factory=list)  # same content as stored
    conflicts: list[dict[str, str]] = field(default_factory=list)  # one per other-content file
    reasons: dict[str, str] = field(default_factory=dict)  # source_uri -> why it failed


def write_shard(
    session: Session,
    *,
    run_id: int,
    model_id: int,
    instances: list[dict[str, Any]],
    outcomes: list[dict[str, Any]],
    predictions: list[dict[str, Any]],
    force: bool = False,
) -> ShardResult:
    """Write one shard: instances, studies, one outcome per file, image predictions.

    Runs inside the caller's transaction (one per shard). A file whose SOP Instance UID is
    already stored with a different ``content_sha256`` is recorded in ``uid_conflicts``, its
    outcome becomes ``failed`` with a reason naming both files, its prediction is dropped, and
    the stored instance is left as it is. The run's heartbeat is written last, in the same
    transaction (see ``sql.runs.heartbeat``). See INSTANCE_KEYS, OUTCOME_KEYS and
    PREDICTION_KEYS (``sql.rows``) for the dicts.
    """
    now = utc_now()
    require_models_and_runs(session, {model_id}, {run_id})
    files = instance_rows(instances)
    reported = outcome_rows(outcomes)
    predicted = prediction_rows(predictions)

    _insert_instances(session, files, run_id=run_id, force=force)
    # After our insert, so that a concurrent writer's committed row counts too.
    stored = _stored_instances(session, _referenced_uids(files, reported, predicted))
    comparison = _compare_with_stored(files, stored)
    _record_conflicts(session, comparison.conflicts, run_id=run_id, now=now)
    _upsert_studies(session, comparison.matching, run_id)
    kept = _image_prediction_rows(
        predicted, stored, comparison.reasons, model_id=model_id, run_id=run_id, now=now
    )
    upsert_image_predictions(session, kept, force=force, verify=False)
    final = _file_outcome_rows(
        reported, files, kept, comparison.reasons, model_id=model_id, run_id=run_id, now=now
    )
    _upsert_file_outcomes(session, final, force=force)
    # The run is alive: last, so that its row is locked only until the commit.
    heartbeat(session, run_id, now=now)
    counts = Counter(r["outcome"] for r in final)
    return ShardResult(
        outcome_counts={o: counts.get(o, 0) for o in OUTCOMES},
        conflicts=tuple(comparison.conflicts),
        predictions_written=len(kept),
        study_uids=frozenset(r["study_instance_uid"] for r in kept),
    )


def _insert_instances(
    session: Session, files: list[dict[str, Any]], *, run_id: int, force: bool
) -> None:
    """The first file per UID is the candidate; an existing row is never replaced (``force``:
    a row with the same content gets its header facts refreshed in place)."""
    candidates: dict[str, dict[str, Any]] = {}
    for row in files:
        candidates.setdefault(row["sop_instance_uid"], row)
    rows = [{**row, "first_seen_run_id": run_id} for row in candidates.values()]
    header = [
        c for c in INSTANCE_KEYS if c not in ("sop_instance_uid", "source_uri", "content_sha256")
    ]
    table = Instance.__table__

    def build(ins):
        if not force:
            return ins.on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        # Same content: refresh header facts in place. Other content: never touched.
        return ins.on_conflict_do_update(
            index_elements=["sop_instance_uid"],
            set_={c: ins.excluded[c] for c in header},
            where=table.c.content_sha256 == ins.excluded.content_sha256,
        )

    upsert_rows(session, table, rows, keys=["sop_instance_uid"], build=build)


def _referenced_uids(
    files: list[dict[str, Any]], reported: list[dict[str, Any]], predicted: list[dict[str, Any]]
) -> list[str]:
    """Every SOP Instance UID the shard names (files, outcomes, predictions)."""
    return sorted(
        {r["sop_instance_uid"] for r in files}
        | {r["sop_instance_uid"] for r in predicted}
        | {r["sop_instance_uid"] for r in reported if r["sop_instance_uid"]}
    )


def _stored_instances(session: Session, uids: Iterable[str]) -> dict[str, dict[str, Any]]:
    table = Instance.__table__
    found: dict[str, dict[str, Any]] = {}
    columns = (
        table.c.sop_instance_uid,
        table.c.content_sha256,
        table.c.source_uri,
        table.c.study_instance_uid,
    )
    for where in member_of(session, table.c.sop_instance_uid, uids):
        for row in session.execute(sa.select(*columns).where(where)).mappings():
            found[row["sop_instance_uid"]] = dict(row)
    return found


def _compare_with_stored(
    files: list[dict[str, Any]], stored: dict[str, dict[str, Any]]
) -> _Comparison:
    """Split the files into those matching the stored instance and UID conflicts (same SOP
    Instance UID, other content), with the reason each conflicting file fails."""
    comparison = _Comparison()
    for row in files:
        existing = stored.get(row["sop_instance_uid"])
        if existing is None:
            raise RuntimeError(
                f"instance {row['sop_instance_uid']} of {row['source_uri']} was neither stored "
                "nor found after the insert"
            )
        if existing["content_sha256"] == row["content_sha256"]:
            comparison.matching.append(row)
            continue
        comparison.conflicts.append(
            {
                "sop_instance_uid": row["sop_instance_uid"],
                "existing_source_uri": existing["source_uri"],
                "existing_content_sha256": existing["content_sha256"],
                "new_source_uri": row["source_uri"],
                "new_content_sha256": row["content_sha256"],
            }
        )
        comparison.reasons[row["source_uri"]] = (
            f"SOP Instance UID {row['sop_instance_uid']} was already stored from "
            f"{existing['source_uri']} (content sha256 {existing['content_sha256'][:16]}...) "
            f"but {row['source_uri']} has different content (sha256 "
            f"{row['content_sha256'][:16]}...); recorded in uid_conflicts, not merged"
        )
    return comparison


def _record_conflicts(
    session: Session, conflicts: list[dict[str, str]], *, run_id: int, now: dt.datetime
) -> None:
    """One ``uid_conflicts`` row per (UID, new file, new content); a known one stays as it is."""
    rows = {
        tuple(c[k] for k in _CONFLICT_KEYS): {**c, "run_id": run_id, "detected_at": now}
        for c in conflicts
    }
    upsert_rows(
        session,
        UidConflict.__table__,
        list(rows.values()),
        keys=_CONFLICT_KEYS,
        build=lambda ins: ins.on_conflict_do_nothing(index_elements=_CONFLICT_KEYS),
    )


def _upsert_studies(session: Session, files: list[dict[str, Any]], run_id: int) -> None:
    """Study facts from the first file of each study; later files (and later shards) only fill
    facts still missing."""
    studies: dict[str, dict[str, Any]] = {}
    for row in files:
        study = studies.setdefault(
            row["study_instance_uid"],
            {"study_instance_uid": row["study_instance_uid"], "first_seen_run_id": run_id}
            | dict.fromkeys(_STUDY_FACTS),
        )
        for key in _STUDY_FACTS:
            if study[key] is None:
                study[key] = row[key]
    table = Study.__table__

    def build(ins):
        excluded = ins.excluded
        return ins.on_conflict_do_update(
            index_elements=["study_instance_uid"],
            set_={k: sa.func.coalesce(table.c[k], excluded[k]) for k in _STUDY_FACTS},
            where=sa.or_(
                *(sa.and_(table.c[k].is_(None), excluded[k].is_not(None)) for k in _STUDY_FACTS)
            ),
        )

    upsert_rows(session, table, list(studies.values()), keys=["study_instance_uid"], build=build)


def _image_prediction_rows(
    predicted: list[dict[str, Any]],
    stored: dict[str, dict[str, Any]],
    conflict_reasons: dict[str, str],
    *,
    model_id: int,
    run_id: int,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """``image_predictions`` rows of the files without a UID conflict, the first per UID; each
    must name a stored instance (and its study)."""
    kept: dict[str, dict[str, Any]] = {}
    for row in predicted:
        if row["source_uri"] in conflict_reasons:
            continue
        uid = row["sop_instance_uid"]
        if uid not in stored:
            raise ValueError(
                f"prediction for SOP Instance UID {uid} ({row['source_uri']}) has no instance: "
                "pass the file's instance dict in the same shard"
            )
        if uid in kept:
            continue
        study = row.get("study_instance_uid") or stored[uid]["study_instance_uid"]
        if study != stored[uid]["study_instance_uid"]:
            raise ValueError(
                f"prediction for SOP Instance UID {uid} names study {study} but the instance "
                f"belongs to study {stored[uid]['study_instance_uid']}"
            )
        kept[uid] = {
            "sop_instance_uid": uid,
            "model_id": model_id,
            "study_instance_uid": study,
            "score": row["score"],
            "label": row["label"],
            "threshold": row["threshold"],
            "preprocessing_sha256": row["preprocessing_sha256"],
            "run_id": run_id,
            "predicted_at": now,
        }
    return list(kept.values())


def _file_outcome_rows(
    reported: list[dict[str, Any]],
    files: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    conflict_reasons: dict[str, str],
    *,
    model_id: int,
    run_id: int,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """One ``file_outcomes`` row per file: a UID conflict turns it ``failed`` (its reason
    added), and ``predicted`` needs a kept prediction."""
    content_by_uri = {r["source_uri"]: r["content_sha256"] for r in files}
    predicted_uids = {r["sop_instance_uid"] for r in kept}
    rows = []
    for row in reported:
        uri = row["source_uri"]
        outcome, reason = row["outcome"], row["reason"]
        if uri in conflict_reasons:
            reason = (
                f"{reason}; also: {conflict_reasons[uri]}"
                if outcome == "failed" and reason
                else conflict_reasons[uri]
            )
            outcome = "failed"
        elif outcome == "predicted" and row["sop_instance_uid"] not in predicted_uids:
            raise ValueError(
                f"outcome 'predicted' for {uri} has no prediction for SOP Instance UID "
                f"{row['sop_instance_uid']} in this shard"
            )
        rows.append(
            {
                "source_uri": uri,
                "model_id": model_id,
                "sop_instance_uid": row["sop_instance_uid"],
                "study_instance_uid": row["study_instance_uid"],
                "content_sha256": row["content_sha256"] or content_by_uri.get(uri),
                "outcome": outcome,
                "reason": reason,
                "facts": row["facts"],
                "thumbnail_path": row["thumbnail_path"],
                "run_id": run_id,
                "updated_at": now,
            }
        )
    return rows


def _upsert_file_outcomes(session: Session, rows: list[dict[str, Any]], *, force: bool) -> None:
    table = FileOutcome.__table__
    keys = ["source_uri", "model_id"]
    upsert_rows(
        session,
        table,
        rows,
        keys=keys,
        build=lambda ins: on_conflict(
            ins, table, keys, [*_OUTCOME_COMPARE, "run_id", "updated_at"], _OUTCOME_COMPARE, force
        ),
    )
