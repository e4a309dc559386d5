"""Idempotent writes: models, runs, shards of file outcomes and predictions, reviews, watermarks.

Every function takes a ``Session`` whose transaction the caller owns::

    with Session.begin() as session:        # one transaction per shard
        result = write_shard(session, run_id=..., model_id=..., instances=..., outcomes=...,
                             predictions=..., force=False)

Every row write is an ``INSERT ... ON CONFLICT`` keyed by DICOM UIDs (or the source URI) plus
the model version. Without ``force`` a conflicting row is only updated when a value actually
differs, so writing the same shard twice leaves every row (``run_id`` and timestamps included)
unchanged; with ``force`` rows are overwritten in place (same keys, same row count). Rows in
each statement are sorted by key so that concurrent writers lock rows in the same order and do
not deadlock. On PostgreSQL, batches of ``COPY_THRESHOLD`` rows or more go through ``COPY``
into a temporary staging table and one ``INSERT ... SELECT ... ON CONFLICT``.

All timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import operator
import re
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from sql.schema import (
    AGGREGATIONS,
    DECISIONS,
    OUTCOMES,
    RUN_KINDS,
    FileOutcome,
    ImagePrediction,
    Instance,
    Model,
    Review,
    Run,
    Study,
    StudyPrediction,
    UidConflict,
    Watermark,
)

logger = logging.getLogger(__name__)

COPY_THRESHOLD = 2000  # rows; PostgreSQL batches at least this big use COPY + staging table
#: A ``running`` run whose heartbeat (``runs.heartbeat_at``: its start, then every committed
#: shard) is older than this when another run starts is marked ``abandoned``. A shard commits
#: within minutes (an outage is retried for about 45 s), so six hours of silence means the
#: process is gone (SIGKILL, OOM killer, a lost host). ``start_run(stale_after=...)`` overrides
#: it; None turns the check off.
STALE_RUN_AFTER = dt.timedelta(hours=6)
#: A heartbeat is written at most this often per run: fan-out workers of one run commit
#: concurrently, and each heartbeat locks the run's row until its transaction commits.
HEARTBEAT_MIN_INTERVAL = dt.timedelta(seconds=30)
# Values per IN (...) list on SQLite (bound variables are limited to 32766 since 3.32).
_IN_CHUNK = 5000 if sqlite3.sqlite_version_info >= (3, 32) else 900
_SHA256 = re.compile(r"[0-9a-f]{64}")

# --- the dicts write_shard expects ------------------------------------------------------------

#: One dict per file whose header was read. Required: sop_instance_uid, study_instance_uid,
#: source_uri, content_sha256 (sha256 hex of the file's bytes). ``study_date`` is a
#: ``datetime.date`` or a DICOM DA string (YYYYMMDD); ``patient_id_hash`` is a keyed hash
#: (64 hex digits) and never a raw ID. Unknown keys are rejected (catches raw PHI and typos).
INSTANCE_KEYS = {
    "sop_instance_uid": True,
    "study_instance_uid": True,
    "source_uri": True,
    "content_sha256": True,
    "series_instance_uid": False,
    "modality": False,
    "body_part": False,
    "view_position": False,
    "photometric_interpretation": False,
    "rows": False,
    "columns": False,
    "bits_stored": False,
    "pixel_representation": False,
    "number_of_frames": False,
    "transfer_syntax_uid": False,
    "study_date": False,
    "accession_number": False,
    "patient_id_hash": False,
}
#: One dict per source file (every file seen ends in exactly one). Required: source_uri,
#: outcome (predicted | skipped | failed); reason is required unless predicted. Optional:
#: sop_instance_uid / study_instance_uid (None when the file failed before they were read),
#: content_sha256 (taken from the file's instance dict when absent), facts (JSON-able dict of
#: preprocessing facts), thumbnail_path.
OUTCOME_KEYS = {
    "source_uri": True,
    "outcome": True,
    "reason": False,
    "sop_instance_uid": False,
    "study_instance_uid": False,
    "content_sha256": False,
    "facts": False,
    "thumbnail_path": False,
}
#: One dict per predicted file. Required: source_uri (the file it came from), sop_instance_uid,
#: score (positive-class probability in [0, 1]), label (bool), threshold, preprocessing_sha256.
#: study_instance_uid is taken from the stored instance when absent.
PREDICTION_KEYS = {
    "source_uri": True,
    "sop_instance_uid": True,
    "score": True,
    "label": True,
    "threshold": True,
    "preprocessing_sha256": True,
    "study_instance_uid": False,
}
RUN_COUNT_KEYS = ("files_seen", "predicted", "skipped", "failed")
MODEL_METADATA_REQUIRED = (
    "name",
    "version",
    "architecture",
    "class_names",
    "positive_class",
    "threshold",
    "input_size",
    "preprocessing",
    "preprocessing_sha256",
)


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


@dataclass(frozen=True)
class WatermarkValue:
    name: str
    value: dt.datetime
    detail: dict[str, Any]
    run_id: int | None
    updated_at: dt.datetime


# --- helpers --------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_keys(kind: str, ident: str, row: Mapping[str, Any], spec: Mapping[str, bool]) -> None:
    if not row.keys() <= spec.keys():
        unknown = sorted(set(row) - set(spec))
        raise ValueError(
            f"{kind} dict for {ident} has unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(spec)}"
        )
    missing = [k for k, required in spec.items() if required and row.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{kind} dict for {ident} lacks required key(s) {', '.join(missing)}")


def _check_sha256(what: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        shown = (
            f"{value!r}" if isinstance(value, str) and len(value) <= 80 else type(value).__name__
        )
        raise ValueError(f"{what} must be 64 lowercase hex digits (a sha256), got {shown}")
    return value


def _check_patient_hash(ident: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        # Never echo the value: it may be the raw patient ID this check exists to keep out.
        length = len(value) if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"patient_id_hash of {ident} must be a keyed hash (64 lowercase hex digits); "
            f"got a value of length {length}, which looks like a raw identifier: refusing it"
        )
    return value


def _study_date(ident: str, value: Any) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        parsed = _parse_da(value)
        if parsed is not None:
            return parsed
    raise ValueError(
        f"(0008,0020) 'Study Date' value {value!r} of {ident} is not a date; "
        "it must be a datetime.date or a DICOM DA string YYYYMMDD"
    )


@functools.lru_cache(maxsize=4096)
def _parse_da(value: str) -> dt.date | None:
    """A DICOM DA (YYYYMMDD) or ISO (YYYY-MM-DD) date, else None."""
    text = value.strip()
    digits = text.replace("-", "") if len(text) == 10 and text[4::3] == "--" else text
    if len(digits) == 8 and digits.isascii() and digits.isdigit():
        try:
            return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            return None
    return None


def _optional_int(ident: str, key: str, value: Any) -> int | None:
    if value is None or type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            as_int = None
        if as_int is None or as_int != value:
            raise ValueError(f"{key} of {ident} must be an integer, got {value!r}")
        return as_int
    return value


def _probability(what: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return number


def _chunks(values: Sequence[Any], size: int = _IN_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _member_of(session: Session, column: sa.ColumnElement, values: Iterable[str]):
    """Filters ``column IN values``, one per chunk, in sorted order: on PostgreSQL one bound
    array per 50,000 values (``= ANY(:array)``), on SQLite IN lists of _IN_CHUNK values."""
    ordered = sorted(set(values))
    if session.get_bind().dialect.name == "postgresql":
        for chunk in _chunks(ordered, 50_000):
            yield column == sa.any_(sa.literal(list(chunk), postgresql.ARRAY(sa.Text)))
    else:
        for chunk in _chunks(ordered):
            yield column.in_(chunk)


def _insert(session: Session, table: sa.Table):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {dialect!r}; use SQLite or PostgreSQL")


def _on_conflict(
    ins,
    table: sa.Table,
    keys: Sequence[str],
    update: Sequence[str],
    compare: Sequence[str],
    force: bool,
):
    """ON CONFLICT (keys): update ``update`` columns, only where a ``compare`` column differs
    (unless ``force``); with no ``update`` columns, DO NOTHING."""
    if not update:
        return ins.on_conflict_do_nothing(index_elements=list(keys))
    excluded = ins.excluded
    where = None
    if not force:
        where = sa.or_(*(table.c[c].is_distinct_from(excluded[c]) for c in compare))
    return ins.on_conflict_do_update(
        index_elements=list(keys), set_={c: excluded[c] for c in update}, where=where
    )


Verify = Callable[[Session, list[dict[str, Any]], Any], None]


def _upsert(
    session: Session,
    table: sa.Table,
    rows: list[dict[str, Any]],
    *,
    keys: Sequence[str],
    build: Callable[[Any], Any],
    verify: Verify | None = None,
) -> None:
    """Insert ``rows`` (uniform keys, unique on ``keys``) with the conflict clause ``build``
    adds, in key order; PostgreSQL batches of COPY_THRESHOLD rows or more go through COPY.

    ``verify(session, rows, staged)`` runs before the insert; ``staged`` is the staging table
    (a ``sa.table``) on the COPY path, else None.
    """
    if not rows:
        return
    rows = sorted(rows, key=lambda r: tuple(r[k] for k in keys))
    if session.get_bind().dialect.name == "postgresql" and len(rows) >= COPY_THRESHOLD:
        _copy_upsert(session, table, rows, keys=keys, build=build, verify=verify)
        return
    if verify is not None:
        verify(session, rows, None)
    session.execute(build(_insert(session, table)), rows)


def _copy_upsert(
    session: Session,
    table: sa.Table,
    rows: list[dict[str, Any]],
    *,
    keys: Sequence[str],
    build: Callable[[Any], Any],
    verify: Verify | None,
) -> None:
    columns = list(rows[0])
    stage = f"_stage_{table.name}_{uuid.uuid4().hex[:12]}"
    connection = session.connection()
    column_list = ", ".join(f'"{c}"' for c in columns)
    # The staged columns with the table's types (collations included), without constraints.
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {stage} ON COMMIT DROP AS "
        f"SELECT {column_list} FROM {table.name} WITH NO DATA"
    )
    # Binary COPY (no text formatting and parsing of numbers and timestamps), typed by the
    # staging table's column types; JSON values go through psycopg's Jsonb adapter.
    oids = dict(
        connection.execute(
            sa.text(
                "SELECT attname, atttypid FROM pg_attribute "
                "WHERE attrelid = CAST(:stage AS regclass) AND attnum > 0"
            ),
            {"stage": stage},
        ).all()
    )
    from psycopg.types.json import Jsonb  # the COPY path is PostgreSQL-only

    json_columns = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, sa.JSON)]
    pick = operator.itemgetter(*columns)
    driver_connection = connection.connection.driver_connection
    with (
        driver_connection.cursor() as cursor,
        cursor.copy(f"COPY {stage} ({column_list}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.set_types([oids[c] for c in columns])
        if json_columns:
            for row in rows:
                values = list(pick(row))
                for i in json_columns:
                    values[i] = Jsonb(values[i])
                copy.write_row(values)
        else:
            for row in rows:
                copy.write_row(pick(row))
    staged = sa.table(stage, *(sa.column(c) for c in columns))
    if verify is not None:
        verify(session, rows, staged)
    select = sa.select(*(staged.c[c] for c in columns)).order_by(*(staged.c[k] for k in keys))
    # Sort the batch in memory (the default 4MB work_mem spills 100k rows to disk), then put
    # the caller's setting back.
    work_mem = connection.exec_driver_sql("SHOW work_mem").scalar_one()
    connection.execute(sa.select(sa.func.set_config("work_mem", "64MB", True)))
    connection.execute(build(postgresql.insert(table).from_select(columns, select)))
    connection.execute(sa.select(sa.func.set_config("work_mem", work_mem, True)))
    connection.exec_driver_sql(f"DROP TABLE {stage}")


# --- models and runs --------------------------------------------------------------------------


def register_model(session: Session, metadata: Mapping[str, Any], sha256: str) -> int:
    """Register a checkpoint (``Checkpoint.metadata()`` and its file's sha256); idempotent.

    Returns the model_id (one row = one model version). Refuses a second checkpoint under a
    name and version that is already registered with a different sha256.
    """
    sha256 = _check_sha256("checkpoint sha256", sha256)
    missing = [k for k in MODEL_METADATA_REQUIRED if metadata.get(k) in (None, "")]
    if missing:
        raise ValueError(f"model metadata lacks required key(s) {', '.join(missing)}")
    models = Model.__table__
    existing = session.execute(
        sa.select(models.c.model_id).where(models.c.sha256 == sha256)
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    name, version = str(metadata["name"]), str(metadata["version"])
    clash = session.execute(
        sa.select(models.c.sha256).where(models.c.name == name, models.c.version == version)
    ).scalar_one_or_none()
    if clash is not None:
        raise ValueError(
            f"model {name!r} version {version!r} is already registered for the checkpoint with "
            f"sha256 {clash}; this checkpoint has sha256 {sha256}: give it a new version"
        )
    row = {
        "name": name,
        "version": version,
        "sha256": sha256,
        "format": metadata.get("format"),
        "architecture": str(metadata["architecture"]),
        "arch_kwargs": dict(metadata.get("arch_kwargs") or {}),
        "class_names": list(metadata["class_names"]),
        "positive_class": str(metadata["positive_class"]),
        "threshold": _probability("model threshold", metadata["threshold"]),
        "input_size": int(metadata["input_size"]),
        "preprocessing": dict(metadata["preprocessing"]),
        "preprocessing_sha256": _check_sha256(
            "preprocessing_sha256", metadata["preprocessing_sha256"]
        ),
        "metrics": dict(metadata.get("metrics") or {}),
        "provenance": dict(metadata.get("provenance") or {}),
        "notes": metadata.get("notes") or None,
        "checkpoint_metadata": json.loads(json.dumps(dict(metadata))),
    }
    session.execute(_insert(session, models).on_conflict_do_nothing(index_elements=["sha256"]), row)
    return session.execute(
        sa.select(models.c.model_id).where(models.c.sha256 == sha256)
    ).scalar_one()


def start_run(
    session: Session,
    *,
    kind: str,
    source: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    selection_policy: Mapping[str, Any] | None = None,
    model_id: int | None = None,
    prefect_flow_run_id: str | None = None,
    started_at: dt.datetime | None = None,
    stale_after: dt.timedelta | None = STALE_RUN_AFTER,
) -> int:
    """Record a run as ``running`` (heartbeat now) and return its run_id.

    In the same transaction, other runs still ``running`` whose heartbeat is older than
    ``stale_after`` are marked ``abandoned`` (see ``abandon_stale_runs``; None: not checked).
    """
    if kind not in RUN_KINDS:
        raise ValueError(f"run kind {kind!r} is not one of {', '.join(RUN_KINDS)}")
    runs = Run.__table__
    now = _now()
    run_id = session.execute(
        sa.insert(runs)
        .values(
            kind=kind,
            source=source,
            parameters=dict(parameters or {}),
            selection_policy=dict(selection_policy or {}),
            model_id=model_id,
            status="running",
            started_at=started_at or now,
            heartbeat_at=now,
            prefect_flow_run_id=None if prefect_flow_run_id is None else str(prefect_flow_run_id),
        )
        .returning(runs.c.run_id)
    ).scalar_one()
    if stale_after is not None:
        abandon_stale_runs(session, stale_after, noticed_by=run_id, now=now)
    return run_id


def abandon_stale_runs(
    session: Session,
    stale_after: dt.timedelta = STALE_RUN_AFTER,
    *,
    noticed_by: int | None = None,
    now: dt.datetime | None = None,
) -> list[int]:
    """Mark ``abandoned`` every ``running`` run whose heartbeat is older than ``stale_after``.

    Such a run's process is gone (killed before it could close the run): it gets
    ``finished_at`` (now) and an ``error`` saying when it was last alive and which run noticed.
    Its counts stay as they were (a run stores them when it closes); the shards it committed
    stay, and running the same command again finishes the job. Should the run be alive after
    all, its next heartbeat sets it back to ``running`` and it can still close itself.
    Returns the run ids marked.
    """
    if stale_after <= dt.timedelta(0):
        raise ValueError(f"stale_after must be positive, got {stale_after}")
    runs = Run.__table__
    now = now or _now()
    cutoff = now - stale_after
    stale = session.execute(
        sa.select(runs.c.run_id, runs.c.heartbeat_at)
        .where(runs.c.status == "running", runs.c.heartbeat_at < cutoff)
        .order_by(runs.c.run_id)
    ).all()
    marked: list[int] = []
    for run_id, heartbeat in stale:
        if run_id == noticed_by:
            continue
        by = f" when run {noticed_by} started" if noticed_by is not None else ""
        error = (
            f"abandoned: no sign of life since {heartbeat:%Y-%m-%d %H:%M:%S} UTC (its last "
            f"heartbeat), more than {_duration(stale_after)} before {now:%Y-%m-%d %H:%M:%S} UTC"
            f"{by}; its process was probably killed (SIGKILL, out of memory, host lost). The "
            "shards it committed are kept; run the same command again to finish the job"
        )
        # The same conditions again: a heartbeat committed meanwhile wins (row lock on
        # PostgreSQL; SQLite transactions are serial).
        result = session.execute(
            sa.update(runs)
            .where(
                runs.c.run_id == run_id,
                runs.c.status == "running",
                runs.c.heartbeat_at < cutoff,
            )
            .values(status="abandoned", finished_at=now, error=error)
        )
        if result.rowcount == 1:
            marked.append(run_id)
            logger.warning("run %d marked abandoned: %s", run_id, error)
    return marked


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return f"{hours} hour{'s' if hours != 1 else ''}"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def heartbeat(session: Session, run_id: int, *, now: dt.datetime | None = None) -> bool:
    """Record a sign of life of ``run_id`` in the caller's transaction (a shard's commit).

    Skipped when the heartbeat is less than ``HEARTBEAT_MIN_INTERVAL`` old (concurrent
    writers of one run then do not queue on its row). An ``abandoned`` run that beats again
    was not dead: it is set back to ``running`` (finished_at and error cleared). Returns
    whether the row was written.
    """
    runs = Run.__table__
    now = now or _now()
    revived = runs.c.status == "abandoned"
    result = session.execute(
        sa.update(runs)
        .where(
            runs.c.run_id == run_id,
            sa.or_(revived, runs.c.heartbeat_at < now - HEARTBEAT_MIN_INTERVAL),
        )
        .values(
            heartbeat_at=now,
            status=sa.case((revived, "running"), else_=runs.c.status),
            finished_at=sa.case((revived, None), else_=runs.c.finished_at),
            error=sa.case((revived, None), else_=runs.c.error),
        )
    )
    return result.rowcount == 1


def finish_run(
    session: Session,
    run_id: int,
    status: str,
    counts: Mapping[str, int],
    error: str | None = None,
    *,
    finished_at: dt.datetime | None = None,
) -> None:
    """Close a running run with its counts (files_seen, predicted, skipped, failed).

    A ``completed`` run must conserve files: files_seen == predicted + skipped + failed. A run
    marked ``abandoned`` that turns out to be alive may close itself too.
    """
    if status not in ("completed", "failed"):
        raise ValueError(f"a run finishes as 'completed' or 'failed', not {status!r}")
    unknown = sorted(set(counts) - set(RUN_COUNT_KEYS))
    missing = [k for k in RUN_COUNT_KEYS if k not in counts]
    if unknown or missing:
        raise ValueError(
            f"run counts need exactly {', '.join(RUN_COUNT_KEYS)}; "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    values = {k: _optional_int(f"run {run_id}", k, counts[k]) for k in RUN_COUNT_KEYS}
    negative = [k for k, v in values.items() if v is None or v < 0]
    if negative:
        raise ValueError(f"run {run_id} counts must be non-negative integers: {negative}")
    outcomes = values["predicted"] + values["skipped"] + values["failed"]
    if status == "completed" and values["files_seen"] != outcomes:
        raise ValueError(
            f"run {run_id} saw {values['files_seen']} files but counts {outcomes} outcomes "
            f"(predicted {values['predicted']} + skipped {values['skipped']} + failed "
            f"{values['failed']}); every file must end in exactly one outcome"
        )
    runs = Run.__table__
    current = session.execute(
        sa.select(runs.c.status).where(runs.c.run_id == run_id)
    ).scalar_one_or_none()
    if current is None:
        raise ValueError(f"run {run_id} does not exist")
    if current not in ("running", "abandoned"):
        raise ValueError(f"run {run_id} is already {current}; it cannot be finished again")
    now = _now()
    session.execute(
        sa.update(runs)
        .where(runs.c.run_id == run_id)
        .values(
            status=status, finished_at=finished_at or now, error=error, heartbeat_at=now, **values
        )
    )


# --- shards ---------------------------------------------------------------------------------


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
    transaction (see ``heartbeat``). See INSTANCE_KEYS, OUTCOME_KEYS and PREDICTION_KEYS for
    the dicts.
    """
    now = _now()
    _require_models_runs(session, {model_id}, {run_id})
    files = _normalise_instances(instances)
    outcome_rows = _normalise_outcomes(outcomes)
    prediction_rows = _normalise_predictions(predictions)

    # 1. Instances: the first file per UID is the candidate; an existing row is never replaced.
    candidates: dict[str, dict[str, Any]] = {}
    for row in files:
        candidates.setdefault(row["sop_instance_uid"], row)
    instance_rows = [{**row, "first_seen_run_id": run_id} for row in candidates.values()]
    header = [c for c in INSTANCE_KEYS if c not in ("sop_instance_uid", "source_uri")]
    instances_table = Instance.__table__
    if force:
        # Same content: refresh header facts in place. Other content: never touched.
        def build_instances(ins):
            excluded = ins.excluded
            return ins.on_conflict_do_update(
                index_elements=["sop_instance_uid"],
                set_={c: excluded[c] for c in header if c != "content_sha256"},
                where=instances_table.c.content_sha256 == excluded.content_sha256,
            )
    else:

        def build_instances(ins):
            return ins.on_conflict_do_nothing(index_elements=["sop_instance_uid"])

    _upsert(
        session, instances_table, instance_rows, keys=["sop_instance_uid"], build=build_instances
    )

    # 2. Compare every file with what is stored now (after our insert, so a concurrent writer's
    #    committed row counts too).
    uids = sorted(
        {r["sop_instance_uid"] for r in files}
        | {r["sop_instance_uid"] for r in prediction_rows}
        | {r["sop_instance_uid"] for r in outcome_rows if r["sop_instance_uid"]}
    )
    stored = _stored_instances(session, uids)
    conflicts: list[dict[str, str]] = []
    conflicting_uris: dict[str, str] = {}
    good_files: list[dict[str, Any]] = []
    for row in files:
        existing = stored.get(row["sop_instance_uid"])
        if existing is None:
            raise RuntimeError(
                f"instance {row['sop_instance_uid']} of {row['source_uri']} was neither stored "
                "nor found after the insert"
            )
        if existing["content_sha256"] == row["content_sha256"]:
            good_files.append(row)
            continue
        conflict = {
            "sop_instance_uid": row["sop_instance_uid"],
            "existing_source_uri": existing["source_uri"],
            "existing_content_sha256": existing["content_sha256"],
            "new_source_uri": row["source_uri"],
            "new_content_sha256": row["content_sha256"],
        }
        conflicts.append(conflict)
        conflicting_uris[row["source_uri"]] = (
            f"SOP Instance UID {row['sop_instance_uid']} was already stored from "
            f"{existing['source_uri']} (content sha256 {existing['content_sha256'][:16]}...) "
            f"but {row['source_uri']} has different content (sha256 "
            f"{row['content_sha256'][:16]}...); recorded in uid_conflicts, not merged"
        )
    conflict_rows = [{**c, "run_id": run_id, "detected_at": now} for c in conflicts]
    unique_conflicts = list(
        {(c["sop_instance_uid"], c["new_source_uri"], c["new_content_sha256"]): c
         for c in conflict_rows}.values()
    )  # fmt: skip
    _upsert(
        session,
        UidConflict.__table__,
        unique_conflicts,
        keys=["sop_instance_uid", "new_source_uri", "new_content_sha256"],
        build=lambda ins: ins.on_conflict_do_nothing(
            index_elements=["sop_instance_uid", "new_source_uri", "new_content_sha256"]
        ),
    )

    # 3. Studies: facts from the first good file; later files only fill facts still missing.
    _upsert_studies(session, good_files, run_id)

    # 4. Predictions of non-conflicting files, one per UID.
    kept: dict[str, dict[str, Any]] = {}
    for row in prediction_rows:
        if row["source_uri"] in conflicting_uris:
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
    upsert_image_predictions(session, list(kept.values()), force=force, verify=False)

    # 5. One outcome per file.
    content_by_uri = {r["source_uri"]: r["content_sha256"] for r in files}
    final_rows = []
    for row in outcome_rows:
        uri = row["source_uri"]
        outcome, reason = row["outcome"], row["reason"]
        if uri in conflicting_uris:
            reason = (
                f"{reason}; also: {conflicting_uris[uri]}"
                if outcome == "failed" and reason
                else conflicting_uris[uri]
            )
            outcome = "failed"
        elif outcome == "predicted" and row["sop_instance_uid"] not in kept:
            raise ValueError(
                f"outcome 'predicted' for {uri} has no prediction for SOP Instance UID "
                f"{row['sop_instance_uid']} in this shard"
            )
        final_rows.append(
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
    compare = [
        "sop_instance_uid",
        "study_instance_uid",
        "content_sha256",
        "outcome",
        "reason",
        "facts",
        "thumbnail_path",
    ]
    outcomes_table = FileOutcome.__table__
    _upsert(
        session,
        outcomes_table,
        final_rows,
        keys=["source_uri", "model_id"],
        build=lambda ins: _on_conflict(
            ins,
            outcomes_table,
            ["source_uri", "model_id"],
            [*compare, "run_id", "updated_at"],
            compare,
            force,
        ),
    )
    # 6. The run is alive: last, so that its row is locked only until the commit.
    heartbeat(session, run_id, now=now)
    counts = Counter(r["outcome"] for r in final_rows)
    return ShardResult(
        outcome_counts={o: counts.get(o, 0) for o in OUTCOMES},
        conflicts=tuple(conflicts),
        predictions_written=len(kept),
        study_uids=frozenset(r["study_instance_uid"] for r in kept.values()),
    )


def upsert_image_predictions(
    session: Session, rows: list[dict[str, Any]], *, force: bool = False, verify: bool = True
) -> None:
    """Upsert image_predictions rows (every column given; unique on sop_instance_uid+model_id).

    ``write_shard`` calls this (with ``verify=False``: it has checked the references already);
    it is public for bulk loads and the benchmark. With ``verify`` the models, runs and
    instances the rows refer to must exist (one set-based check per call).
    """
    table = ImagePrediction.__table__
    keys = ["sop_instance_uid", "model_id"]
    compare = ["study_instance_uid", "score", "label", "threshold", "preprocessing_sha256"]
    if verify and rows:
        _require_models_runs(session, {r["model_id"] for r in rows}, {r["run_id"] for r in rows})
    _upsert(
        session,
        table,
        rows,
        keys=keys,
        build=lambda ins: _on_conflict(
            ins, table, keys, [*compare, "run_id", "predicted_at"], compare, force
        ),
        verify=_verify_instances if verify else None,
    )


def _verify_instances(session: Session, rows: list[dict[str, Any]], staged: Any) -> None:
    """Every row's (sop_instance_uid, study_instance_uid) must be a stored instance."""
    instances = Instance.__table__
    if staged is not None:
        orphans = session.execute(
            sa.select(staged.c.sop_instance_uid, staged.c.study_instance_uid)
            .outerjoin(instances, instances.c.sop_instance_uid == staged.c.sop_instance_uid)
            .where(
                sa.or_(
                    instances.c.sop_instance_uid.is_(None),
                    instances.c.study_instance_uid != staged.c.study_instance_uid,
                )
            )
            .limit(3)
        ).all()
    else:
        studies: dict[str, str] = {}
        uids = (r["sop_instance_uid"] for r in rows)
        for where in _member_of(session, instances.c.sop_instance_uid, uids):
            query = sa.select(instances.c.sop_instance_uid, instances.c.study_instance_uid)
            studies.update((sop, study) for sop, study in session.execute(query.where(where)))
        orphans = [
            (r["sop_instance_uid"], r["study_instance_uid"])
            for r in rows
            if studies.get(r["sop_instance_uid"]) != r["study_instance_uid"]
        ][:3]
    if orphans:
        sop, study = orphans[0]
        raise ValueError(
            f"image prediction for SOP Instance UID {sop} (study {study}) has no matching stored "
            "instance; write the instance first (write_shard does both)"
        )


def _require_models_runs(session: Session, model_ids: set[int], run_ids: set[int]) -> None:
    models, runs = Model.__table__, Run.__table__
    found = set(
        session.execute(
            sa.select(models.c.model_id).where(models.c.model_id.in_(sorted(model_ids)))
        ).scalars()
    )
    if model_ids - found:
        raise ValueError(f"model_id {sorted(model_ids - found)} not registered")
    found = set(
        session.execute(
            sa.select(runs.c.run_id).where(runs.c.run_id.in_(sorted(run_ids)))
        ).scalars()
    )
    if run_ids - found:
        raise ValueError(f"run_id {sorted(run_ids - found)} does not exist (start_run first)")


def _normalise_instances(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows, seen_uris = [], set()
    for item in instances:
        ident = str(item.get("source_uri") or item.get("sop_instance_uid"))
        _check_keys("instance", ident, item, INSTANCE_KEYS)
        if item["source_uri"] in seen_uris:
            raise ValueError(f"instance dict for {item['source_uri']} appears twice in the shard")
        seen_uris.add(item["source_uri"])
        row = {k: item.get(k) for k in INSTANCE_KEYS}
        row["content_sha256"] = _check_sha256(f"content_sha256 of {ident}", row["content_sha256"])
        row["study_date"] = _study_date(ident, row["study_date"])
        row["patient_id_hash"] = _check_patient_hash(ident, row["patient_id_hash"])
        for key in ("rows", "columns", "bits_stored", "pixel_representation", "number_of_frames"):
            row[key] = _optional_int(ident, key, row[key])
        rows.append(row)
    return rows


def _normalise_outcomes(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for item in outcomes:
        ident = str(item.get("source_uri"))
        _check_keys("outcome", ident, item, OUTCOME_KEYS)
        if item["outcome"] not in OUTCOMES:
            raise ValueError(
                f"outcome {item['outcome']!r} of {ident} is not one of {', '.join(OUTCOMES)}"
            )
        if item["outcome"] != "predicted" and not item.get("reason"):
            raise ValueError(f"outcome {item['outcome']!r} of {ident} needs a reason")
        if item["outcome"] == "predicted" and not item.get("sop_instance_uid"):
            raise ValueError(f"outcome 'predicted' of {ident} needs its sop_instance_uid")
        if ident in seen:
            raise ValueError(f"outcome dict for {ident} appears twice in the shard")
        seen.add(ident)
        facts = item.get("facts") or {}
        if not isinstance(facts, dict):
            raise ValueError(f"facts of {ident} must be a dict, got {type(facts).__name__}")
        _refuse_patient_keys(f"facts of {ident}", facts)
        content = item.get("content_sha256")
        rows.append(
            {
                "source_uri": item["source_uri"],
                "outcome": item["outcome"],
                "reason": item.get("reason") or None,
                "sop_instance_uid": item.get("sop_instance_uid") or None,
                "study_instance_uid": item.get("study_instance_uid") or None,
                "content_sha256": None
                if content is None
                else _check_sha256(f"content_sha256 of {ident}", content),
                "facts": json.loads(json.dumps(facts, sort_keys=True)),  # plain JSON, stable order
                "thumbnail_path": None
                if item.get("thumbnail_path") is None
                else str(item["thumbnail_path"]),
            }
        )
    return rows


def _refuse_patient_keys(what: str, value: Any) -> None:
    """Patient identifiers never go into free-form JSON (only keyed hashes, in their column)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if "patient" in str(key).lower():
                raise ValueError(
                    f"{what} has the key {key!r}: patient data is not stored in facts "
                    "(pass a keyed hash as the instance's patient_id_hash instead)"
                )
            _refuse_patient_keys(what, inner)
    elif isinstance(value, list):
        for inner in value:
            _refuse_patient_keys(what, inner)


def _normalise_predictions(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for item in predictions:
        ident = str(item.get("source_uri") or item.get("sop_instance_uid"))
        _check_keys("prediction", ident, item, PREDICTION_KEYS)
        if not isinstance(item["label"], bool):
            raise ValueError(f"label of {ident} must be a bool, got {item['label']!r}")
        rows.append(
            {
                "source_uri": item["source_uri"],
                "sop_instance_uid": item["sop_instance_uid"],
                "study_instance_uid": item.get("study_instance_uid"),
                "score": _probability(f"score of {ident}", item["score"]),
                "label": item["label"],
                "threshold": _probability(f"threshold of {ident}", item["threshold"]),
                "preprocessing_sha256": _check_sha256(
                    f"preprocessing_sha256 of {ident}", item["preprocessing_sha256"]
                ),
            }
        )
    return rows


def _stored_instances(session: Session, uids: Iterable[str]) -> dict[str, dict[str, Any]]:
    table = Instance.__table__
    found: dict[str, dict[str, Any]] = {}
    columns = (
        table.c.sop_instance_uid,
        table.c.content_sha256,
        table.c.source_uri,
        table.c.study_instance_uid,
    )
    for where in _member_of(session, table.c.sop_instance_uid, uids):
        for row in session.execute(sa.select(*columns).where(where)).mappings():
            found[row["sop_instance_uid"]] = dict(row)
    return found


def _upsert_studies(session: Session, files: list[dict[str, Any]], run_id: int) -> None:
    facts = ("accession_number", "study_date", "patient_id_hash")
    studies: dict[str, dict[str, Any]] = {}
    for row in files:
        study = studies.setdefault(
            row["study_instance_uid"],
            {"study_instance_uid": row["study_instance_uid"], "first_seen_run_id": run_id}
            | dict.fromkeys(facts),
        )
        for key in facts:
            if study[key] is None:
                study[key] = row[key]
    table = Study.__table__

    def build(ins):
        excluded = ins.excluded
        return ins.on_conflict_do_update(
            index_elements=["study_instance_uid"],
            set_={k: sa.func.coalesce(table.c[k], excluded[k]) for k in facts},
            where=sa.or_(*(sa.and_(table.c[k].is_(None), excluded[k].is_not(None)) for k in facts)),
        )

    _upsert(session, table, list(studies.values()), keys=["study_instance_uid"], build=build)


# --- study aggregation and the planner's lookup -----------------------------------------------


def upsert_study_predictions(
    session: Session,
    model_id: int,
    run_id: int,
    rule: str = "max",
    study_uids: Iterable[str] | None = None,
    *,
    threshold: float | None = None,
    force: bool = False,
) -> None:
    """(Re)compute study predictions from image_predictions in SQL, one statement per chunk.

    ``rule``: ``max`` (the study is as positive as its most positive image) or ``mean``.
    The label is ``score >= threshold``, the threshold defaulting to the model's.
    ``study_uids``: the studies to aggregate (None: every study this model predicted).
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation rule {rule!r} is not one of {', '.join(AGGREGATIONS)}")
    models = Model.__table__
    if threshold is None:
        threshold = session.execute(
            sa.select(models.c.threshold).where(models.c.model_id == model_id)
        ).scalar_one_or_none()
        if threshold is None:
            raise ValueError(f"model {model_id} does not exist")
    threshold = _probability("study threshold", threshold)
    ip = ImagePrediction.__table__
    table = StudyPrediction.__table__
    score = sa.func.max(ip.c.score) if rule == "max" else sa.func.avg(ip.c.score)
    now = _now()
    columns = [
        "study_instance_uid",
        "model_id",
        "aggregation",
        "n_images",
        "score",
        "label",
        "threshold",
        "run_id",
        "predicted_at",
    ]
    compare = ["aggregation", "n_images", "score", "label", "threshold"]

    def statement(where):
        select = (
            sa.select(
                ip.c.study_instance_uid,
                sa.literal(model_id, sa.Integer),
                sa.literal(rule, sa.Text),
                sa.func.count(),
                score,
                sa.case((score >= threshold, sa.true()), else_=sa.false()),
                sa.literal(threshold, sa.Double),
                sa.literal(run_id, sa.Integer),
                sa.literal(now, table.c.predicted_at.type),
            )
            .where(ip.c.model_id == model_id, where)
            .group_by(ip.c.study_instance_uid)
            .order_by(ip.c.study_instance_uid)
        )
        ins = _insert(session, table).from_select(columns, select)
        return _on_conflict(
            ins,
            table,
            ["study_instance_uid", "model_id"],
            [*compare, "run_id", "predicted_at"],
            compare,
            force,
        )

    if study_uids is None:
        session.execute(statement(sa.true()))
        return
    for where in _member_of(session, ip.c.study_instance_uid, study_uids):
        session.execute(statement(where))


def predicted_sop_uids(session: Session, model_id: int, sop_uids: Iterable[str]) -> set[str]:
    """The subset of ``sop_uids`` this model version already predicted (the planner's skip)."""
    table = ImagePrediction.__table__
    found: set[str] = set()
    for where in _member_of(session, table.c.sop_instance_uid, sop_uids):
        found.update(
            session.execute(
                sa.select(table.c.sop_instance_uid).where(table.c.model_id == model_id, where)
            ).scalars()
        )
    return found


# --- reviews and watermarks -------------------------------------------------------------------


def add_review(
    session: Session,
    *,
    study_instance_uid: str,
    decision: str,
    reviewer: str,
    note: str | None = None,
    model_id: int | None = None,
    created_at: dt.datetime | None = None,
) -> int:
    """Append a review (agree | disagree | uncertain) of a study; the latest one counts.

    Needs only what the PostgreSQL ``cxr_reviewer`` role has: INSERT of the review columns,
    and SELECT on the reviews id sequence to learn the new id (``currval``). The study (and
    the model, when given) must exist; the foreign keys check that, so the writer never reads
    ``studies``.
    """
    if decision not in DECISIONS:
        raise ValueError(f"review decision {decision!r} is not one of {', '.join(DECISIONS)}")
    if not reviewer or not reviewer.strip():
        raise ValueError("a review needs the reviewer's name")
    reviews = Review.__table__
    values: dict[str, Any] = {
        "study_instance_uid": study_instance_uid,
        "model_id": model_id,
        "decision": decision,
        "reviewer": reviewer.strip(),
        "note": note,
    }
    postgresql_db = session.get_bind().dialect.name == "postgresql"
    if created_at is not None or not postgresql_db:
        # PostgreSQL reviewers may not set created_at: its default (the transaction's start)
        # applies. SQLite's default has whole seconds only, so the time is given there.
        values["created_at"] = created_at or _now()
    # Plain INSERT text: SQLAlchemy would add RETURNING review_id on PostgreSQL, which needs
    # SELECT on reviews (reviewers have none).
    insert = sa.text(
        f"INSERT INTO reviews ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)})"
    ).bindparams(*(sa.bindparam(k, type_=reviews.c[k].type) for k in values))
    try:
        with session.begin_nested():  # a refused insert leaves the caller's transaction usable
            session.execute(insert, values)
            if postgresql_db:
                sequence = sa.func.pg_get_serial_sequence("reviews", "review_id")
                return session.execute(sa.select(sa.func.currval(sequence))).scalar_one()
            return session.execute(sa.text("SELECT last_insert_rowid()")).scalar_one()
    except sa.exc.IntegrityError as exc:
        missing = _missing_review_reference(session, exc, study_instance_uid, model_id)
        if missing is None:
            raise
        raise ValueError(missing) from None


def _missing_review_reference(
    session: Session, exc: sa.exc.IntegrityError, study_instance_uid: str, model_id: int | None
) -> str | None:
    """The reason a review insert broke a foreign key, or None for another integrity error."""
    study = f"study {study_instance_uid} is not in the database; nothing to review"
    model = f"model_id {model_id} is not registered"
    diag = getattr(getattr(exc, "orig", None), "diag", None)
    if diag is not None:  # PostgreSQL names the constraint
        constraint = diag.constraint_name or ""
        if constraint == "fk_reviews_study_instance_uid_studies":
            return study
        if constraint == "fk_reviews_model_id_models":
            return model
        return None
    if "FOREIGN KEY" not in str(exc.orig):
        return None
    # SQLite does not say which key (and has no privileges to respect): look.
    studies = Study.__table__
    found = session.execute(
        sa.select(studies.c.study_instance_uid).where(
            studies.c.study_instance_uid == study_instance_uid
        )
    ).scalar_one_or_none()
    return study if found is None else model


def get_watermark(session: Session, name: str) -> WatermarkValue | None:
    table = Watermark.__table__
    row = session.execute(sa.select(table).where(table.c.name == name)).mappings().first()
    return None if row is None else WatermarkValue(**row)


def set_watermark(
    session: Session,
    name: str,
    value: dt.datetime,
    detail: Mapping[str, Any] | None = None,
    run_id: int | None = None,
) -> None:
    """Create or move the watermark ``name`` (an aware datetime plus JSON detail)."""
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise ValueError(f"watermark {name!r} needs a timezone-aware datetime, got {value!r}")
    table = Watermark.__table__
    row = {
        "name": name,
        "value": value,
        "detail": json.loads(json.dumps(dict(detail or {}))),
        "run_id": run_id,
        "updated_at": _now(),
    }
    ins = _insert(session, table)
    session.execute(
        ins.on_conflict_do_update(
            index_elements=["name"],
            set_={c: ins.excluded[c] for c in ("value", "detail", "run_id", "updated_at")},
        ),
        row,
    )


# --- integrity audit ------------------------------------------------------------------------

_INTEGRITY_CHECKS = {
    "image_predictions_without_instance": """
        SELECT COUNT(*) FROM image_predictions AS p
        WHERE NOT EXISTS (
            SELECT 1 FROM instances AS i WHERE i.sop_instance_uid = p.sop_instance_uid)""",
    "image_predictions_with_other_study": """
        SELECT COUNT(*) FROM image_predictions AS p
        JOIN instances AS i ON i.sop_instance_uid = p.sop_instance_uid
        WHERE i.study_instance_uid <> p.study_instance_uid""",
    "image_predictions_without_model": """
        SELECT COUNT(*) FROM image_predictions AS p
        WHERE NOT EXISTS (SELECT 1 FROM models AS m WHERE m.model_id = p.model_id)""",
    "image_predictions_without_run": """
        SELECT COUNT(*) FROM image_predictions AS p
        WHERE NOT EXISTS (SELECT 1 FROM runs AS r WHERE r.run_id = p.run_id)""",
    "file_outcomes_without_model": """
        SELECT COUNT(*) FROM file_outcomes AS o
        WHERE NOT EXISTS (SELECT 1 FROM models AS m WHERE m.model_id = o.model_id)""",
    "file_outcomes_without_run": """
        SELECT COUNT(*) FROM file_outcomes AS o
        WHERE NOT EXISTS (SELECT 1 FROM runs AS r WHERE r.run_id = o.run_id)""",
    "predicted_outcomes_without_prediction": """
        SELECT COUNT(*) FROM file_outcomes AS o
        WHERE o.outcome = 'predicted' AND NOT EXISTS (
            SELECT 1 FROM image_predictions AS p
            WHERE p.sop_instance_uid = o.sop_instance_uid AND p.model_id = o.model_id)""",
    "instances_without_study": """
        SELECT COUNT(*) FROM instances AS i
        WHERE NOT EXISTS (
            SELECT 1 FROM studies AS s WHERE s.study_instance_uid = i.study_instance_uid)""",
    "instances_without_run": """
        SELECT COUNT(*) FROM instances AS i
        WHERE i.first_seen_run_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM runs AS r WHERE r.run_id = i.first_seen_run_id)""",
}


def check_integrity(session: Session) -> dict[str, int]:
    """Count rows breaking a reference the per-file tables do not enforce with FOREIGN KEYs.

    Returns ``{check name: number of offending rows}``; all zeros means consistent. Full
    scans: meant for an occasional ``cxr-screen db check``, not for every run.
    """
    return {
        name: session.execute(sa.text(sql)).scalar_one() for name, sql in _INTEGRITY_CHECKS.items()
    }
