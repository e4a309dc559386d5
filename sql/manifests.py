"""Shard manifests of fan-out jobs: planned by the parent, claimed and advanced by workers.

Every function takes a ``Session`` whose transaction the caller owns. The lifecycle::

    add_manifest(...)          # parent: plan (idempotent per job_key + shard_index)
    claim_manifest(...)        # worker: attempts + 1; the latest claim owns the manifest
    record_progress(...)       # worker: in the SAME transaction as the chunk's results
    fail_manifest(...)         # worker: the error, for the parent and the operator
    job_manifests(...)         # parent: status of every manifest (files not loaded)
    compact_job(...)           # parent: drop the file lists once the job is complete

Planning, claiming and the chunks' ``write_shard`` write the job run's heartbeat
(``sql.runs.heartbeat``), so a job whose workers make progress is not taken for an abandoned
run (and one that was, beats it back to ``running``).

``record_progress`` refuses (``ManifestLost``) when another claim took the manifest over or the
progress moved on: the caller's transaction then rolls back with the chunk's results, so a
worker that lost its manifest (a "zombie" after its replacement started) never double-counts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql.runs import heartbeat
from sql.schema import Run, ShardManifest
from sql.upsert import dialect_insert, utc_now

OUTCOME_KEYS = ("predicted", "skipped", "failed")


class ManifestError(RuntimeError):
    """A manifest cannot be used as asked (missing, planned differently, wrong owner)."""


class ManifestLost(ManifestError):
    """The manifest was claimed again (or moved on) after this worker claimed it."""


@dataclass(frozen=True)
class Manifest:
    manifest_id: int
    job_key: str
    shard_index: int
    run_id: int
    model_id: int
    parameters: dict[str, Any]
    n_files: int
    files_sha256: str
    status: str
    files_done: int
    counts: dict[str, int]
    study_uids: list[str]
    attempts: int
    worker: str | None
    prefect_flow_run_id: str | None
    error: str | None
    files: list[dict[str, Any]] | None = None  # None when not loaded

    @property
    def done(self) -> bool:
        return self.status == "done"


def files_digest(files: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the file records in canonical JSON (order matters: it is the plan)."""
    text = json.dumps(list(files), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _table() -> sa.Table:
    return ShardManifest.__table__


def _columns(with_files: bool) -> list[sa.Column]:
    table = _table()
    return [c for c in table.c if with_files or c.name != "files"]


def _manifest(row: Any, with_files: bool) -> Manifest:
    data = dict(row._mapping)
    files = data.pop("files", None) if with_files else None
    for key in ("created_at", "updated_at"):
        data.pop(key, None)
    data["counts"] = {k: int(v) for k, v in (data["counts"] or {}).items()}
    data["study_uids"] = list(data["study_uids"] or [])
    return Manifest(**data, files=files)


def add_manifest(
    session: Session,
    *,
    job_key: str,
    shard_index: int,
    run_id: int,
    model_id: int,
    parameters: Mapping[str, Any],
    files: Sequence[Mapping[str, Any]],
) -> Manifest:
    """Store a planned manifest, or return the one already planned at this position.

    Planning again (a retried parent) must give the same files: a different list means the
    sources changed since the job was planned, and resuming it would skip or repeat files.
    """
    if not job_key:
        raise ValueError("a fan-out job needs a non-empty job_key")
    if shard_index < 0:
        raise ValueError(f"shard_index should be 0 or more instead of {shard_index}")
    table = _table()
    digest = files_digest(files)
    now = utc_now()
    # The run's row before the manifest's, as in a chunk's transaction (no deadlock).
    heartbeat(session, run_id, now=now)
    session.execute(
        dialect_insert(session, table)
        .values(
            job_key=job_key,
            shard_index=shard_index,
            run_id=run_id,
            model_id=model_id,
            parameters=dict(parameters),
            files=[dict(f) for f in files],
            n_files=len(files),
            files_sha256=digest,
            status="pending",
            files_done=0,
            counts={},
            study_uids=[],
            attempts=0,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["job_key", "shard_index"])
    )
    stored = session.execute(
        sa.select(*_columns(False)).where(
            table.c.job_key == job_key, table.c.shard_index == shard_index
        )
    ).one()
    manifest = _manifest(stored, with_files=False)
    if manifest.files_sha256 != digest:
        raise ManifestError(
            f"fan-out job {job_key!r} shard {shard_index} was planned with other files "
            f"(sha256 {manifest.files_sha256[:12]}..., now {digest[:12]}...): the sources "
            "changed since the job started; start a new job instead of resuming this one"
        )
    if (manifest.run_id, manifest.model_id) != (run_id, model_id):
        raise ManifestError(
            f"fan-out job {job_key!r} shard {shard_index} belongs to run {manifest.run_id} "
            f"and model {manifest.model_id}, not run {run_id} and model {model_id}"
        )
    return manifest


def get_manifest(session: Session, manifest_id: int, *, with_files: bool = True) -> Manifest:
    """The manifest; ``ManifestError`` when this database has none with that id."""
    row = session.execute(
        sa.select(*_columns(with_files)).where(_table().c.manifest_id == manifest_id)
    ).one_or_none()
    if row is None:
        raise ManifestError(
            f"shard manifest {manifest_id} does not exist in this results database; the "
            "worker's CXR_SCREEN_DATABASE_URL must name the database the fan-out job planned in"
        )
    return _manifest(row, with_files)


def claim_manifest(
    session: Session,
    manifest_id: int,
    *,
    worker: str,
    prefect_flow_run_id: str | None = None,
) -> Manifest:
    """Take a manifest over (attempts + 1, status running) and return it with its files.

    A manifest that is already done is returned unchanged (nothing left to do). The returned
    ``attempts`` is this claim's token for ``record_progress`` and ``fail_manifest``.
    """
    table = _table()
    run_id = session.execute(
        sa.select(table.c.run_id).where(table.c.manifest_id == manifest_id)
    ).scalar_one_or_none()
    if run_id is not None:
        # The run's row before the manifest's, as in a chunk's transaction (no deadlock).
        heartbeat(session, run_id)
    session.execute(
        sa.update(table)
        .where(table.c.manifest_id == manifest_id, table.c.status != "done")
        .values(
            attempts=table.c.attempts + 1,
            status="running",
            worker=worker,
            prefect_flow_run_id=prefect_flow_run_id,
            error=None,
            updated_at=utc_now(),
        )
    )
    return get_manifest(session, manifest_id)


def record_progress(
    session: Session,
    manifest_id: int,
    *,
    attempt: int,
    files_done_before: int,
    files: int,
    counts: Mapping[str, int],
    study_uids: Iterable[str],
) -> Manifest:
    """Advance a claimed manifest by ``files`` committed files and their outcome counts.

    Call it in the transaction that wrote those files' results. Raises ``ManifestLost`` when
    the claim ``attempt`` is no longer the latest or the progress is not ``files_done_before``
    (another worker committed first); the caller's transaction must then roll back.
    """
    table = _table()
    query = sa.select(*_columns(False)).where(table.c.manifest_id == manifest_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = session.execute(query).one_or_none()
    if row is None:
        raise ManifestError(f"shard manifest {manifest_id} does not exist")
    current = _manifest(row, with_files=False)
    if (current.attempts, current.files_done, current.status) != (
        attempt,
        files_done_before,
        "running",
    ):
        raise ManifestLost(
            f"shard manifest {manifest_id} moved on: this worker holds claim {attempt} at file "
            f"{files_done_before}, the database has claim {current.attempts} at file "
            f"{current.files_done} ({current.status}, last claimed by {current.worker}); "
            "this chunk's results are rolled back"
        )
    if files < 0 or files_done_before + files > current.n_files:
        raise ValueError(
            f"shard manifest {manifest_id}: {files} more files after {files_done_before} "
            f"exceeds its {current.n_files} files"
        )
    unknown = sorted(set(counts) - set(OUTCOME_KEYS))
    if unknown:
        raise ValueError(f"outcome counts {unknown} are not among {', '.join(OUTCOME_KEYS)}")
    merged = {k: current.counts.get(k, 0) + int(counts.get(k, 0)) for k in OUTCOME_KEYS}
    done = files_done_before + files
    if done == current.n_files and sum(merged.values()) != current.n_files:
        raise ValueError(
            f"shard manifest {manifest_id} has {current.n_files} files but counts "
            f"{sum(merged.values())} outcomes {merged}; every file must end in one outcome"
        )
    studies = sorted(set(current.study_uids).union(study_uids))
    status = "done" if done == current.n_files else "running"
    result = session.execute(
        sa.update(table)
        .where(
            table.c.manifest_id == manifest_id,
            table.c.attempts == attempt,
            table.c.files_done == files_done_before,
        )
        .values(
            files_done=done, counts=merged, study_uids=studies, status=status, updated_at=utc_now()
        )
    )
    if result.rowcount != 1:  # only reachable on SQLite without the row lock: same message
        raise ManifestLost(f"shard manifest {manifest_id} moved on while this chunk was written")
    return get_manifest(session, manifest_id, with_files=False)


def fail_manifest(session: Session, manifest_id: int, *, attempt: int, error: str) -> bool:
    """Mark the claim ``attempt`` failed with its reason; False when it was already taken over."""
    table = _table()
    result = session.execute(
        sa.update(table)
        .where(
            table.c.manifest_id == manifest_id,
            table.c.attempts == attempt,
            table.c.status == "running",
        )
        .values(status="failed", error=error, updated_at=utc_now())
    )
    return result.rowcount == 1


def job_manifests(session: Session, job_key: str) -> list[Manifest]:
    """Every manifest of a job in shard order, without the file lists."""
    table = _table()
    rows = session.execute(
        sa.select(*_columns(False)).where(table.c.job_key == job_key).order_by(table.c.shard_index)
    ).all()
    return [_manifest(r, with_files=False) for r in rows]


def job_run(session: Session, job_key: str) -> tuple[int, int] | None:
    """``(run_id, model_id)`` of a job planned before, or None for a new job."""
    table = _table()
    row = session.execute(
        sa.select(table.c.run_id, table.c.model_id)
        .where(table.c.job_key == job_key)
        .order_by(table.c.shard_index)
        .limit(1)
    ).one_or_none()
    return None if row is None else (row.run_id, row.model_id)


def compact_job(session: Session, job_key: str) -> int:
    """Drop the file lists of a job's done manifests (every file has its outcome row by then);
    counts, studies, workers and attempts stay. Returns the manifests compacted."""
    table = _table()
    result = session.execute(
        sa.update(table)
        .where(table.c.job_key == job_key, table.c.status == "done", table.c.n_files > 0)
        .values(files=[], updated_at=utc_now())
    )
    return result.rowcount


def delete_job(session: Session, job_key: str) -> int:
    """Remove every manifest of a job (a plan that failed before anything was launched)."""
    table = _table()
    return session.execute(sa.delete(table).where(table.c.job_key == job_key)).rowcount


def reopen_run(session: Session, run_id: int) -> str:
    """Set a resumed job's run back to ``running`` (a failed parent closed it as failed, or a
    later run marked it abandoned), with a fresh heartbeat.

    Returns the status it had; a ``completed`` run is left alone (the job is finished).
    """
    runs = Run.__table__
    status = session.execute(
        sa.select(runs.c.status).where(runs.c.run_id == run_id)
    ).scalar_one_or_none()
    if status is None:
        raise ManifestError(f"run {run_id} of the fan-out job does not exist")
    if status == "completed":
        return status
    session.execute(
        sa.update(runs)
        .where(runs.c.run_id == run_id)
        .values(status="running", finished_at=None, error=None, heartbeat_at=utc_now())
    )
    return status
