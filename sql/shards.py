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

**One instance is one instance.** An instance is its SOP Instance UID; whether two files hold
the same instance is decided by their content fingerprints (``same_content``), not by their
bytes, so a lossless copy in another encoding is the same instance. For each model version one
file per instance is predicted; a copy with the same content is *skipped* as a duplicate (its
reason names the UID, the run that predicted it and the file it came from), whether it comes
in the same shard, a later shard, a later run or from another source. A copy whose content
differs (a lossy copy under the same UID) is a conflict: recorded in ``uid_conflicts``,
*failed*, never merged.

**One file never fails a shard.** When a file's values are refused (a row check, or the
database: ``sql.errors.is_data_error``), the shard's files are bisected in savepoints until the
offending files are found; those are recorded *failed* with a reason naming the column and the
DICOM tag (never the value), and the rest of the shard is stored in the same transaction. A
lost connection or a schema problem still raises (the caller retries, or stops).
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql import rows as row_checks
from sql.errors import is_data_error
from sql.predictions import upsert_image_predictions
from sql.rows import (
    FINGERPRINT_KEYS,
    INSTANCE_KEYS,
    RowValueError,
    column_label,
    instance_rows,
    outcome_rows,
    prediction_rows,
)
from sql.runs import heartbeat, require_models_and_runs
from sql.schema import OUTCOMES, FileOutcome, ImagePrediction, Instance, Study, UidConflict
from sql.upsert import member_of, on_conflict, upsert_rows, utc_now

_STUDY_FACTS = ("accession_number", "study_date", "patient_id_hash")
_CONFLICT_KEYS = ["sop_instance_uid", "new_source_uri", "new_content_sha256"]
_OUTCOME_COMPARE = [
    "sop_instance_uid",
    "study_instance_uid",
    "content_sha256",
    *FINGERPRINT_KEYS,
    "outcome",
    "reason",
    "facts",
    "thumbnail_path",
]
# Header facts a forced write refreshes on a stored instance with the same content.
_HEADER_FACTS = [
    c
    for c in INSTANCE_KEYS
    if c not in ("sop_instance_uid", "source_uri", "content_sha256", *FINGERPRINT_KEYS)
]


@dataclass(frozen=True)
class ShardResult:
    """What ``write_shard`` stored.

    outcome_counts: files per final outcome (a UID conflict turns a file into ``failed``, a
        duplicate into ``skipped``, a refused file into ``failed``).
    conflicts: one dict per file whose SOP Instance UID was already stored with other content.
    predictions_written: image predictions written (one per instance and model version).
    study_uids: studies with a prediction in this shard (feed to ``upsert_study_predictions``).
    duplicates: one dict per file skipped as a copy of an instance already predicted
        (source_uri, sop_instance_uid, reason).
    refused: one dict per file whose values were refused (source_uri, reason); each is stored
        as *failed* with that reason.
    """

    outcome_counts: dict[str, int]
    conflicts: tuple[dict[str, str], ...]
    predictions_written: int
    study_uids: frozenset[str]
    duplicates: tuple[dict[str, str], ...] = ()
    refused: tuple[dict[str, str], ...] = ()


@dataclass
class _File:
    """The dicts one source file brought to the shard (the unit the bisection isolates)."""

    uri: Any
    instances: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Comparison:
    """The shard's files against the stored instances."""

    matching: list[dict[str, Any]] = field(default_factory=list)  # same content as stored
    conflicts: list[dict[str, str]] = field(default_factory=list)  # one per other-content file
    reasons: dict[str, str] = field(default_factory=dict)  # source_uri -> why it failed
    refresh: list[dict[str, Any]] = field(default_factory=list)  # stored rows to update


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

    Runs inside the caller's transaction (one per shard), in a savepoint. A file whose SOP
    Instance UID is already stored with different content is recorded in ``uid_conflicts``, its
    outcome becomes ``failed`` with a reason naming both files, its prediction is dropped, and
    the stored instance is left as it is; a copy with the same content as an instance this model
    version already predicted becomes ``skipped`` (see the module text). Files whose values are
    refused are found by bisection and stored as ``failed`` (``ShardResult.refused``); the rest
    is written. The run's heartbeat is written last, in the same transaction (see
    ``sql.runs.heartbeat``). See INSTANCE_KEYS, OUTCOME_KEYS and PREDICTION_KEYS
    (``sql.rows``) for the dicts.
    """
    now = utc_now()
    require_models_and_runs(session, {model_id}, {run_id})
    parts: list[ShardResult] = []
    refused: list[tuple[_File, BaseException]] = []
    pending = [_files(instances, outcomes, predictions)]
    while pending:
        part = pending.pop()
        if not part:
            continue
        try:
            with session.begin_nested():
                parts.append(
                    _write_files(session, part, run_id=run_id, model_id=model_id, force=force)
                )
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(part) == 1:
                refused.append((part[0], exc))
                continue
            middle = len(part) // 2
            pending += [part[middle:], part[:middle]]  # the first half is tried first
    if refused:
        parts.append(_record_refused(session, refused, run_id=run_id, model_id=model_id))
    # The run is alive: last, so that its row is locked only until the commit.
    heartbeat(session, run_id, now=now)
    return _merged(parts)


def _files(
    instances: list[dict[str, Any]],
    outcomes: list[dict[str, Any]],
    predictions: list[dict[str, Any]],
) -> list[_File]:
    """The dicts grouped by source file, in the order the files first appear."""
    files: dict[Any, _File] = {}
    for kind, dicts in (
        ("instances", instances),
        ("outcomes", outcomes),
        ("predictions", predictions),
    ):
        for position, item in enumerate(dicts):
            uri = item.get("source_uri") if isinstance(item, dict) else None
            key = uri if isinstance(uri, str) and uri else (kind, position)
            getattr(files.setdefault(key, _File(uri)), kind).append(item)
    return list(files.values())


def _write_files(
    session: Session, part: list[_File], *, run_id: int, model_id: int, force: bool
) -> ShardResult:
    """Check and write the files of ``part`` (the body of ``write_shard``, heartbeat aside)."""
    now = utc_now()
    files = instance_rows([i for f in part for i in f.instances])
    reported = outcome_rows([o for f in part for o in f.outcomes])
    predicted = prediction_rows([p for f in part for p in f.predictions])

    _insert_instances(session, files, run_id=run_id)
    uids = _referenced_uids(files, reported, predicted)
    # After our insert, so that a concurrent writer's committed row counts too.
    stored = _stored_instances(session, uids)
    held = _held_predictions(session, model_id, uids)
    comparison = _compare_with_stored(files, stored, force=force)
    _refresh_instances(session, comparison.refresh)
    _record_conflicts(session, comparison.conflicts, run_id=run_id, now=now)
    _upsert_studies(session, comparison.matching, run_id)
    kept, duplicates = _image_prediction_rows(
        predicted,
        stored,
        held,
        comparison,
        model_id=model_id,
        run_id=run_id,
        now=now,
    )
    upsert_image_predictions(session, kept, force=force, verify=False)
    final = _file_outcome_rows(
        reported,
        files,
        kept,
        comparison.reasons,
        duplicates,
        model_id=model_id,
        run_id=run_id,
        now=now,
    )
    _upsert_file_outcomes(session, final, force=force)
    counts = Counter(r["outcome"] for r in final)
    return ShardResult(
        outcome_counts={o: counts.get(o, 0) for o in OUTCOMES},
        conflicts=tuple(comparison.conflicts),
        predictions_written=len(kept),
        study_uids=frozenset(r["study_instance_uid"] for r in kept),
        duplicates=tuple(
            {"source_uri": uri, "sop_instance_uid": uid, "reason": reason}
            for uri, (uid, reason) in duplicates.items()
        ),
    )


def _merged(parts: list[ShardResult]) -> ShardResult:
    counts: Counter = Counter()
    for part in parts:
        counts.update(part.outcome_counts)
    return ShardResult(
        outcome_counts={o: counts.get(o, 0) for o in OUTCOMES},
        conflicts=tuple(c for p in parts for c in p.conflicts),
        predictions_written=sum(p.predictions_written for p in parts),
        study_uids=frozenset(s for p in parts for s in p.study_uids),
        duplicates=tuple(d for p in parts for d in p.duplicates),
        refused=tuple(r for p in parts for r in p.refused),
    )


# --- identity ----------------------------------------------------------------------------------


def same_content(stored: dict[str, Any], new: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether two files of one SOP Instance UID hold the same content, and on what basis.

    In order: the same content hash (``content_sha256``: the same bytes, native pixel data
    compared by its stored values) is the same content; two pixel fingerprints
    of one scheme decide; the same codestream fingerprint is the same content (a different one
    proves nothing: a lossless re-encoding changes the codestream, not the pixels). Two files
    without any fingerprint are compared by their bytes alone (rows from before fingerprints).
    Otherwise the answer is None: the content could not be compared. A fingerprint's scheme is
    the text before its first ``:``; fingerprints of different schemes are not compared.
    """
    if stored["content_sha256"] == new["content_sha256"]:
        return True, "same content hash"
    pixel = _comparable(stored.get("pixel_fingerprint"), new.get("pixel_fingerprint"))
    if pixel is not None:
        return pixel, "pixel fingerprint"
    if _comparable(stored.get("codestream_fingerprint"), new.get("codestream_fingerprint")):
        return True, "codestream fingerprint"
    if not any(stored.get(k) for k in FINGERPRINT_KEYS) and not any(
        new.get(k) for k in FINGERPRINT_KEYS
    ):
        return False, "content sha256"
    return None, _why_not_compared(stored, new)


def _comparable(a: str | None, b: str | None) -> bool | None:
    """Equal, different, or None when either is missing or their schemes differ."""
    if not a or not b or row_checks.fingerprint_scheme(a) != row_checks.fingerprint_scheme(b):
        return None
    return a == b


def _why_not_compared(stored: dict[str, Any], new: dict[str, Any]) -> str:
    def kinds(row: dict[str, Any]) -> str:
        have = [k.replace("_", " ") for k in FINGERPRINT_KEYS if row.get(k)]
        return " and ".join(have) if have else "no fingerprint (stored before fingerprints)"

    return f"the stored copy has {kinds(stored)}, this file has {kinds(new)}"


# --- the steps of a write ---------------------------------------------------------------------


def _insert_instances(session: Session, files: list[dict[str, Any]], *, run_id: int) -> None:
    """The first file per UID is the candidate; an existing row is never replaced here (a
    forced write refreshes the header facts of a row with the same content later,
    ``_refresh_instances``)."""
    candidates: dict[str, dict[str, Any]] = {}
    for row in files:
        candidates.setdefault(row["sop_instance_uid"], row)
    rows = [{**row, "first_seen_run_id": run_id} for row in candidates.values()]
    upsert_rows(
        session,
        Instance.__table__,
        rows,
        keys=["sop_instance_uid"],
        build=lambda ins: ins.on_conflict_do_nothing(index_elements=["sop_instance_uid"]),
    )


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
    columns = [table.c[c] for c in INSTANCE_KEYS if c in table.c]
    for where in member_of(session, table.c.sop_instance_uid, uids):
        for row in session.execute(sa.select(*columns).where(where)).mappings():
            found[row["sop_instance_uid"]] = dict(row)
    return found


@dataclass(frozen=True)
class _Held:
    """A stored image prediction of this model version: the run that wrote it and the files
    recorded as *predicted* for its instance."""

    run_id: int
    sources: frozenset[str]


def _held_predictions(session: Session, model_id: int, uids: list[str]) -> dict[str, _Held]:
    predictions, outcomes = ImagePrediction.__table__, FileOutcome.__table__
    runs: dict[str, int] = {}
    sources: dict[str, set[str]] = {}
    for where in member_of(session, predictions.c.sop_instance_uid, uids):
        query = sa.select(predictions.c.sop_instance_uid, predictions.c.run_id).where(
            predictions.c.model_id == model_id, where
        )
        runs.update((uid, run) for uid, run in session.execute(query))
    for where in member_of(session, outcomes.c.sop_instance_uid, runs):
        query = sa.select(outcomes.c.sop_instance_uid, outcomes.c.source_uri).where(
            outcomes.c.model_id == model_id, outcomes.c.outcome == "predicted", where
        )
        for uid, uri in session.execute(query):
            sources.setdefault(uid, set()).add(uri)
    return {uid: _Held(run, frozenset(sources.get(uid, ()))) for uid, run in runs.items()}


def _compare_with_stored(
    files: list[dict[str, Any]], stored: dict[str, dict[str, Any]], *, force: bool
) -> _Comparison:
    """Split the files into those with the stored instance's content, UID conflicts (same SOP
    Instance UID, other content) and files that could not be compared, with the reason each
    file that is not matching fails; and the stored rows to update (fingerprints they lack,
    and with ``force`` header facts that changed)."""
    comparison = _Comparison()
    refreshed: set[str] = set()
    for row in files:
        uid, uri = row["sop_instance_uid"], row["source_uri"]
        existing = stored.get(uid)
        if existing is None:
            raise RuntimeError(
                f"instance {uid} of {uri} was neither stored nor found after the insert"
            )
        same, basis = same_content(existing, row)
        if same:
            comparison.matching.append(row)
            if uid not in refreshed:
                update = _refresh(existing, row, force=force)
                if update:
                    refreshed.add(uid)
                    comparison.refresh.append({"uid": uid, **update})
            continue
        if same is None:
            comparison.reasons[uri] = (
                f"SOP Instance UID {uid} was already stored from {existing['source_uri']}, and "
                f"the content of {uri} could not be compared with it ({basis}); not predicted "
                "and not recorded in uid_conflicts: screen both files again with full "
                "decoding (not reduced) and --force to compare their pixels"
            )
            continue
        old_value, new_value = _compared_values(existing, row, basis)
        comparison.conflicts.append(
            {
                "sop_instance_uid": uid,
                "existing_source_uri": existing["source_uri"],
                "existing_content_sha256": existing["content_sha256"],
                "new_source_uri": uri,
                "new_content_sha256": row["content_sha256"],
            }
        )
        comparison.reasons[uri] = (
            f"SOP Instance UID {uid} was already stored from {existing['source_uri']} "
            f"({basis} {old_value[:16]}...) but {uri} has different content ({basis} "
            f"{new_value[:16]}...); recorded in uid_conflicts, not merged"
        )
    return comparison


def _compared_values(existing: dict[str, Any], row: dict[str, Any], basis: str) -> tuple[str, str]:
    key = "pixel_fingerprint" if basis == "pixel fingerprint" else "content_sha256"
    return existing[key], row[key]


def _refresh(existing: dict[str, Any], row: dict[str, Any], *, force: bool) -> dict[str, Any]:
    """The columns of a stored instance to update from a file with the same content: the
    fingerprints it lacks, and with ``force`` the header facts that differ."""
    update = {k: row[k] for k in FINGERPRINT_KEYS if row.get(k) and not existing.get(k)}
    if force and existing["source_uri"] == row["source_uri"]:
        update |= {k: row[k] for k in _HEADER_FACTS if existing.get(k) != row[k]}
    return update


def _refresh_instances(session: Session, updates: list[dict[str, Any]]) -> None:
    """Update stored instances, one statement per set of columns, in key order."""
    table = Instance.__table__
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for update in sorted(updates, key=lambda u: u["uid"]):
        by_columns.setdefault(tuple(sorted(k for k in update if k != "uid")), []).append(update)
    for columns, rows in by_columns.items():
        statement = (
            sa.update(table)
            .where(table.c.sop_instance_uid == sa.bindparam("uid"))
            .values({c: sa.bindparam(f"new_{c}") for c in columns})
        )
        session.connection().execute(
            statement, [{"uid": r["uid"], **{f"new_{c}": r[c] for c in columns}} for r in rows]
        )


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
    held: dict[str, _Held],
    comparison: _Comparison,
    *,
    model_id: int,
    run_id: int,
    now: dt.datetime,
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """``image_predictions`` rows of the files with the stored content, one per UID, and the
    duplicates: ``{source_uri: (uid, reason)}`` of the files whose instance this model version
    predicted already (from another file, earlier in the shard or before it). Each prediction
    must name a stored instance (and its study)."""
    kept: dict[str, dict[str, Any]] = {}
    kept_from: dict[str, str] = {}
    duplicates: dict[str, tuple[str, str]] = {}
    bases = {
        r["source_uri"]: same_content(stored[r["sop_instance_uid"]], r)[1]
        for r in comparison.matching
    }
    for row in predicted:
        uri, uid = row["source_uri"], row["sop_instance_uid"]
        if uri in comparison.reasons:
            continue
        if uid not in stored:
            raise ValueError(
                f"prediction for SOP Instance UID {uid} ({uri}) has no instance: "
                "pass the file's instance dict in the same shard"
            )
        earlier = held.get(uid)
        if uid in kept or (earlier is not None and uri not in earlier.sources):
            # The run that wrote the prediction, by number also when it is this one: the
            # reason stays the same when the copy is screened again later (rows unchanged).
            if uid in kept:
                by, source = run_id, kept_from[uid]
            else:
                by, source = earlier.run_id, _source_of(earlier, stored[uid])
            duplicates[uri] = (
                uid,
                f"duplicate: SOP Instance UID {uid} was already predicted in run {by} from "
                f"{source}, and this copy has the same content "
                f"({bases.get(uri, 'same content hash')}); not predicted again",
            )
            continue
        study = row.get("study_instance_uid") or stored[uid]["study_instance_uid"]
        if study != stored[uid]["study_instance_uid"]:
            raise ValueError(
                f"prediction for SOP Instance UID {uid} names study {study} but the instance "
                f"belongs to study {stored[uid]['study_instance_uid']}"
            )
        kept_from[uid] = uri
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
    return list(kept.values()), duplicates


def _source_of(held: _Held, instance: dict[str, Any]) -> str:
    """The file a stored prediction came from: the instance's first file when it is one of the
    files recorded as predicted, else the first of those (by name); the instance's first file
    when none is recorded."""
    if not held.sources or instance["source_uri"] in held.sources:
        return instance["source_uri"]
    return min(held.sources)


def _file_outcome_rows(
    reported: list[dict[str, Any]],
    files: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    failed_reasons: dict[str, str],
    duplicates: dict[str, tuple[str, str]],
    *,
    model_id: int,
    run_id: int,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """One ``file_outcomes`` row per file: a UID conflict (or content that could not be
    compared) turns it ``failed`` (its reason added), a duplicate ``skipped``, and
    ``predicted`` needs a kept prediction."""
    by_uri = {r["source_uri"]: r for r in files}
    predicted_uids = {r["sop_instance_uid"] for r in kept}
    rows = []
    for row in reported:
        uri = row["source_uri"]
        outcome, reason = row["outcome"], row["reason"]
        if uri in failed_reasons:
            reason = (
                f"{reason}; also: {failed_reasons[uri]}"
                if outcome == "failed" and reason
                else failed_reasons[uri]
            )
            outcome = "failed"
        elif outcome == "predicted" and uri in duplicates:
            outcome, reason = "skipped", duplicates[uri][1]
        elif outcome == "predicted" and row["sop_instance_uid"] not in predicted_uids:
            raise ValueError(
                f"outcome 'predicted' for {uri} has no prediction for SOP Instance UID "
                f"{row['sop_instance_uid']} in this shard"
            )
        instance = by_uri.get(uri, {})
        rows.append(
            {
                "source_uri": uri,
                "model_id": model_id,
                "sop_instance_uid": row["sop_instance_uid"],
                "study_instance_uid": row["study_instance_uid"],
                "content_sha256": row["content_sha256"] or instance.get("content_sha256"),
                **{k: row[k] or instance.get(k) for k in FINGERPRINT_KEYS},
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


# --- files whose values were refused ----------------------------------------------------------


def _record_refused(
    session: Session, refused: list[tuple[_File, BaseException]], *, run_id: int, model_id: int
) -> ShardResult:
    """Store each refused file as *failed* with the reason; raises the first file's error when
    not even that can be stored."""
    entries = []
    for file, exc in refused:
        reason = refusal_reason(file, exc)
        outcome = file.outcomes[0] if file.outcomes else {}
        entries.append(
            (
                file,
                exc,
                {
                    "source_uri": file.uri,
                    "outcome": "failed",
                    "reason": reason,
                    "sop_instance_uid": _plain_text(outcome.get("sop_instance_uid")),
                    "study_instance_uid": _plain_text(outcome.get("study_instance_uid")),
                },
            )
        )
    stored = []
    for file, exc, entry in entries:
        if not isinstance(file.uri, str) or not file.uri:
            raise exc  # no file to record it against: a caller's bug
        for attempt in (entry, _bare(entry)):
            try:
                with session.begin_nested():
                    stored.append(
                        _write_files(
                            session,
                            [_File(file.uri, outcomes=[attempt])],
                            run_id=run_id,
                            model_id=model_id,
                            force=False,
                        )
                    )
                break
            except Exception as inner:
                if not is_data_error(inner):
                    raise
                if attempt is not entry:
                    raise exc from inner
    merged = _merged(stored)
    return ShardResult(
        outcome_counts=merged.outcome_counts,
        conflicts=(),
        predictions_written=0,
        study_uids=frozenset(),
        refused=tuple(
            {"source_uri": e["source_uri"], "reason": e["reason"]} for _, _, e in entries
        ),
    )


def _plain_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _bare(entry: dict[str, Any]) -> dict[str, Any]:
    """The failed outcome with nothing but an escaped source URI and the reason: for a file
    whose UIDs (or URI) are themselves what the database refuses."""
    uri = entry["source_uri"].encode("unicode_escape").decode("ascii")
    return {**entry, "source_uri": uri[:1024], "sop_instance_uid": None, "study_instance_uid": None}


def refusal_reason(file: _File | None, exc: BaseException) -> str:
    """Why a file's rows were refused, naming the column and its DICOM tag, never the value."""
    return (
        f"not stored: the results database refused {_refused_what(file, exc)}; this file is "
        "recorded as failed and the rest of its shard was stored"
    )


_SQLITE_CONSTRAINT = re.compile(r"(CHECK|NOT NULL|UNIQUE|FOREIGN KEY) constraint failed: ([\w.]+)")


def _refused_what(file: _File | None, exc: BaseException) -> str:
    if isinstance(exc, RowValueError):
        return f"the value of {exc.column}, which {exc.rule}"
    if file is not None and not isinstance(exc, sa.exc.IntegrityError):
        found = _unstorable_value(file)
        if found is not None:
            return found
    orig = getattr(exc, "orig", None)
    diag = getattr(orig, "diag", None)
    constraint = getattr(diag, "constraint_name", None)
    column = getattr(diag, "column_name", None)
    table = getattr(diag, "table_name", None)
    if constraint or column:
        where = f"{table}.{column}" if table and column else (column or table or "a table")
        return f"a row of {where}" + (f" (constraint {constraint})" if constraint else "")
    match = _SQLITE_CONSTRAINT.search(str(orig if orig is not None else exc))
    if match:
        return f"a row that breaks the {match.group(1)} constraint {match.group(2)}"
    if isinstance(exc, ValueError) and not isinstance(exc, sa.exc.StatementError):
        return f"its rows ({row_checks.clean_text(str(exc), 300)})"
    sqlstate = getattr(orig, "sqlstate", None)
    kind = type(orig if orig is not None else exc).__name__
    return f"one of its values ({kind}" + (f", SQLSTATE {sqlstate})" if sqlstate else ")")


def _unstorable_value(file: _File) -> str | None:
    """The first column of the file's rows, as the row checks made them, holding something a
    database refuses (a control character, a lone surrogate, a non-finite number or one out of
    range), named with its DICOM tag; None when nothing is found."""
    try:
        tables = (
            ("instances", instance_rows(file.instances)),
            ("file_outcomes", outcome_rows(file.outcomes)),
            ("image_predictions", prediction_rows(file.predictions)),
        )
    except (ValueError, TypeError):
        return None
    for table, checked in tables:
        for row in checked:
            for key, value in row.items():
                problem = _problem(value)
                if problem:
                    return f"the value of {column_label(table, key)}, which {problem}"
    return None


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _problem(value: Any, depth: int = 0) -> str | None:
    if depth > 50:
        return "is nested too deeply"
    if isinstance(value, str):
        if "\x00" in value:
            return "holds a NUL character"
        if _SURROGATE.search(value):
            return "holds a character that is not valid Unicode"
        if _CONTROL.search(value):
            return "holds a control character"
        return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**63 else "holds a number out of range"
    if isinstance(value, float):
        return None if value == value and abs(value) != float("inf") else "is not a finite number"
    if isinstance(value, dict):
        for key, inner in value.items():
            problem = _problem(key, depth + 1) or _problem(inner, depth + 1)
            if problem:
                return problem
    if isinstance(value, list | tuple):
        for inner in value:
            problem = _problem(inner, depth + 1)
            if problem:
                return problem
    return None
