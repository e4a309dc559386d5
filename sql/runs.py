"""Models and runs: registering a checkpoint, a run's life (start, heartbeat, finish, abandoned),
and watermarks (what the last successful nightly run picked up).

Every function takes a ``Session`` whose transaction the caller owns::

    with Session.begin() as session:
        model_id = register_model(session, checkpoint.metadata(), checkpoint.sha256)
        run_id = start_run(session, kind="nightly", model_id=model_id)

A run is ``running`` from ``start_run`` until ``finish_run`` closes it ``completed`` or
``failed``, or ``interrupt_run`` closes it ``interrupted`` (SIGINT or SIGTERM). Whatever the
ending, the caller closes the run after its last shard has committed (or rolled back), with the
counts of the committed shards: the run's counts then always equal its committed rows.
``runs.heartbeat_at`` is its last sign of life (its start, then every committed
shard); a run silent for longer than ``STALE_RUN_AFTER`` when another run starts is marked
``abandoned``, and set back to ``running`` should it beat again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql.rows import (
    MODEL_METADATA_REQUIRED,
    RUN_COUNT_KEYS,
    TEXT_LIMITS,
    check_optional_int,
    check_probability,
    check_sha256,
    clean_json,
    clean_text,
)
from sql.schema import RUN_KINDS, Model, Run, Watermark
from sql.upsert import dialect_insert, utc_now

logger = logging.getLogger(__name__)

#: A ``running`` run whose heartbeat (``runs.heartbeat_at``: its start, then every committed
#: shard) is older than this when another run starts is marked ``abandoned``. A shard commits
#: within minutes (an outage is retried for about 45 s), so six hours of silence means the
#: process is gone (SIGKILL, OOM killer, a lost host). ``start_run(stale_after=...)`` overrides
#: it; None turns the check off.
STALE_RUN_AFTER = dt.timedelta(hours=6)
_UNLIMITED = 10**9  # a run's parameters are kept whole (only their text is made safe)
#: The statuses a run closes with (``finish_run``).
CLOSING_STATUSES = ("completed", "failed", "interrupted")
#: A heartbeat is written at most this often per run: fan-out workers of one run commit
#: concurrently, and each heartbeat locks the run's row until its transaction commits.
HEARTBEAT_MIN_INTERVAL = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class WatermarkValue:
    name: str
    value: dt.datetime
    detail: dict[str, Any]
    run_id: int | None
    updated_at: dt.datetime


# --- models -----------------------------------------------------------------------------------


def register_model(session: Session, metadata: Mapping[str, Any], sha256: str) -> int:
    """Register a checkpoint (``Checkpoint.metadata()`` and its file's sha256); idempotent.

    Returns the model_id (one row = one model version). Refuses a second checkpoint under a
    name and version that is already registered with a different sha256.
    """
    sha256 = check_sha256("checkpoint sha256", sha256)
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
        "threshold": check_probability("model threshold", metadata["threshold"]),
        "input_size": int(metadata["input_size"]),
        "preprocessing": dict(metadata["preprocessing"]),
        "preprocessing_sha256": check_sha256(
            "preprocessing_sha256", metadata["preprocessing_sha256"]
        ),
        "metrics": dict(metadata.get("metrics") or {}),
        "provenance": dict(metadata.get("provenance") or {}),
        "notes": metadata.get("notes") or None,
        "checkpoint_metadata": json.loads(json.dumps(dict(metadata))),
    }
    insert = dialect_insert(session, models).on_conflict_do_nothing(index_elements=["sha256"])
    session.execute(insert, row)
    return session.execute(
        sa.select(models.c.model_id).where(models.c.sha256 == sha256)
    ).scalar_one()


def require_models_and_runs(session: Session, model_ids: set[int], run_ids: set[int]) -> None:
    """Refuse (ValueError) model ids that are not registered and run ids that do not exist:
    the per-file tables have no foreign keys, so the writers check their references here."""
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


# --- runs -------------------------------------------------------------------------------------


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
    now = utc_now()
    run_id = session.execute(
        sa.insert(runs)
        .values(
            kind=kind,
            source=None if source is None else clean_text(str(source), TEXT_LIMITS["text"]),
            parameters=clean_json(dict(parameters or {}), max_items=_UNLIMITED),
            selection_policy=clean_json(dict(selection_policy or {}), max_items=_UNLIMITED),
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
    now = now or utc_now()
    cutoff = now - stale_after
    stale = session.execute(
        sa.select(runs.c.run_id, runs.c.heartbeat_at)
        .where(runs.c.status == "running", runs.c.heartbeat_at < cutoff)
        .order_by(runs.c.run_id)
    ).all()
    marked: list[int] = []
    for run_id, heartbeat_at in stale:
        if run_id == noticed_by:
            continue
        by = f" when run {noticed_by} started" if noticed_by is not None else ""
        error = (
            f"abandoned: no sign of life since {heartbeat_at:%Y-%m-%d %H:%M:%S} UTC (its last "
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
    now = now or utc_now()
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

    ``status``: completed, failed or interrupted (``interrupt_run`` words the error of the
    last). A ``completed`` run must conserve files: files_seen == predicted + skipped + failed.
    A run marked ``abandoned`` that turns out to be alive may close itself too. Call it after
    the run's last shard committed, with the committed shards' counts.
    """
    if status not in CLOSING_STATUSES:
        raise ValueError(
            f"a run finishes as {', '.join(map(repr, CLOSING_STATUSES))}, not {status!r}"
        )
    values = _run_counts(run_id, status, counts)
    runs = Run.__table__
    current = session.execute(
        sa.select(runs.c.status).where(runs.c.run_id == run_id)
    ).scalar_one_or_none()
    if current is None:
        raise ValueError(f"run {run_id} does not exist")
    if current not in ("running", "abandoned"):
        raise ValueError(f"run {run_id} is already {current}; it cannot be finished again")
    now = utc_now()
    session.execute(
        sa.update(runs)
        .where(runs.c.run_id == run_id)
        .values(
            status=status,
            finished_at=finished_at or now,
            error=None if error is None else clean_text(str(error), TEXT_LIMITS["text"]),
            heartbeat_at=now,
            **values,
        )
    )


def interrupt_run(
    session: Session,
    run_id: int,
    counts: Mapping[str, int],
    signal_name: str = "a signal",
    *,
    finished_at: dt.datetime | None = None,
) -> str:
    """Close a run stopped by SIGINT or SIGTERM as ``interrupted``; returns the error recorded.

    Call it once the shard being written has committed or rolled back, with the counts of the
    committed shards (every file of those in exactly one outcome, so files_seen must equal
    predicted + skipped + failed): the run's counts then equal its committed rows. Re-running
    the same command finishes the job (the committed files are skipped as already predicted).
    """
    values = _run_counts(run_id, "completed", counts)  # the same conservation rule
    error = (
        f"interrupted by {signal_name} after {values['files_seen']} files in committed shards "
        "(nothing after them was stored); run the same command again to finish the job"
    )
    finish_run(session, run_id, "interrupted", values, error, finished_at=finished_at)
    return error


def _run_counts(run_id: int, status: str, counts: Mapping[str, int]) -> dict[str, int]:
    """The run's counts checked: exactly RUN_COUNT_KEYS, non-negative integers, and for a
    ``completed`` run every file seen in exactly one outcome."""
    unknown = sorted(set(counts) - set(RUN_COUNT_KEYS))
    missing = [k for k in RUN_COUNT_KEYS if k not in counts]
    if unknown or missing:
        raise ValueError(
            f"run counts need exactly {', '.join(RUN_COUNT_KEYS)}; "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    values = {k: check_optional_int(f"run {run_id}", k, counts[k]) for k in RUN_COUNT_KEYS}
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
    return values


# --- watermarks -------------------------------------------------------------------------------


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
        "updated_at": utc_now(),
    }
    ins = dialect_insert(session, table)
    session.execute(
        ins.on_conflict_do_update(
            index_elements=["name"],
            set_={c: ins.excluded[c] for c in ("value", "detail", "run_id", "updated_at")},
        ),
        row,
    )
