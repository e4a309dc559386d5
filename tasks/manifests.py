"""Fan-out without Prefect: plan shard manifests, screen one manifest, aggregate the job.

A fan-out job splits its sources into manifests of *file records* (where to re-open each file:
uri, path, member, container, offset, size; never its bytes), stored in the results database
(``sql.manifests``) where every worker reads them. A worker screens one manifest in chunks of
``shard_size`` files; each chunk's results and the manifest's progress commit in one
transaction, so a worker that dies mid-manifest loses at most its current chunk and the next
claim resumes where it stopped. Studies whose images landed in different manifests are
re-aggregated by the parent once every manifest is done.

Compressed tar streams (``.tar.gz``, ``.tar.bz2``, ``.tar.xz``) have no random access: a
member can only be reached by decompressing the stream from its start, so a record cannot
point into one. Planning either refuses them (``CompressedTarError``, with what to do) or, given
``spool_dir`` (a folder every worker mounts at the same path), writes their members out there
once, while discovery reads the stream anyway; the records keep the members' original URIs,
so results are keyed exactly as a single-process run keys them. The spool of a job is removed
when the job completes.

``flows/fanout.py`` wraps these as Prefect flows and launches one sub-flow run per manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from model.checkpoint import Checkpoint
from sql import manifests as store
from sql import predictions, runs
from sql.db import session_factory
from sql.shards import ShardResult
from tasks.dicom.discovery import DEFAULT_LIMITS, ArchiveLimits, SourceFile, discover
from tasks.dicom.selection import SelectionPolicy
from tasks.ingest import ScanRequest, scan_item
from tasks.screening import RunContext, ShardProcessor, ShardRows
from tasks.shard_loop import ShardLoop, ShardSteps, Steps, Tally

RECORD_FIELDS = ("uri", "path", "member", "container", "offset", "size", "error")
_DEFAULTS = {"member": None, "container": "file", "offset": 0, "size": None, "error": None}
_KEY_CHECK = b"cxr-screen fan-out: patient-identifier key check"

log = logging.getLogger(__name__)


class CompressedTarError(ValueError):
    """A compressed tar member met while planning without a spool folder."""


class FanoutMismatch(RuntimeError):
    """A worker's model or key differs from the one the job was planned with."""


# --- file records ------------------------------------------------------------------------------


def to_record(src: SourceFile) -> dict[str, Any]:
    """The JSON record that re-opens ``src`` in another process (defaults left out)."""
    if src.container == "inline" and src.error is None:
        raise CompressedTarError(compressed_tar_message(src.uri))
    record: dict[str, Any] = {"uri": src.uri, "path": src.path}
    for name, default in _DEFAULTS.items():
        value = getattr(src, name)
        if value != default:
            record[name] = value
    if record.get("container") == "inline":  # an errored member: nothing to re-open
        record["container"] = "file"
    return record


def from_record(record: dict[str, Any]) -> SourceFile:
    unknown = sorted(set(record) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"file record fields {unknown} are not among {', '.join(RECORD_FIELDS)}")
    return SourceFile(**{**_DEFAULTS, **record})


def compressed_tar_message(uri: str) -> str:
    archive = uri.split("!/", 1)[0]
    return (
        f"{archive} is a compressed tar stream: its members cannot be read by other workers "
        "without decompressing it from the start, so it cannot be fanned out as it is. Give the "
        "fan-out a spool folder that every worker mounts at the same path (spool_dir, or "
        "CXR_SCREEN_SPOOL_DIR) to write its members out once, convert it to .tar or .zip, or "
        "screen it with the single-process reprocess flow"
    )


def _slug(job_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", job_key)[:120] or "job"


def job_spool(spool_dir: str | os.PathLike[str], job_key: str) -> Path:
    return Path(spool_dir) / _slug(job_key)


def spool_member(src: SourceFile, spool_dir: str | os.PathLike[str], job_key: str) -> SourceFile:
    """Write a compressed-tar member's bytes under the job's spool folder (atomically); the
    returned entry reads that file but keeps the member's URI."""
    if src.data is None:
        raise ValueError(f"{src.uri}: the member's bytes were not carried with it")
    digest = hashlib.sha256(src.uri.encode("utf-8", "surrogateescape")).hexdigest()
    folder = job_spool(spool_dir, job_key) / digest[:2]
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    path = folder / f"{digest[2:]}.dcm"
    if not (path.exists() and path.stat().st_size == len(src.data)):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".spool-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(src.data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return SourceFile(uri=src.uri, path=str(path), container="file", size=len(src.data))


def remove_spool(spool_dir: str | os.PathLike[str] | None, job_key: str) -> None:
    if spool_dir:
        shutil.rmtree(job_spool(spool_dir, job_key), ignore_errors=True)


def file_records(
    sources: Iterable[str | os.PathLike[str]],
    *,
    job_key: str,
    spool_dir: str | os.PathLike[str] | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> Iterator[dict[str, Any]]:
    """Every discovered file as a record, in discovery order (streamed)."""
    for src in discover(sources, limits):
        if src.container == "inline" and src.error is None:
            if spool_dir is None:
                raise CompressedTarError(compressed_tar_message(src.uri))
            src = spool_member(src, spool_dir, job_key)
        yield to_record(src)


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    if size < 1:
        raise ValueError(f"a batch size should be at least 1 instead of {size}")
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def key_fingerprint(hmac_key: bytes) -> str:
    """A keyed fingerprint of the patient-identifier key: equal keys give equal fingerprints,
    and the fingerprint does not reveal the key."""
    return hmac.new(hmac_key, _KEY_CHECK, hashlib.sha256).hexdigest()[:16]


# --- the parent: open, plan, close ---------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A fan-out job's run in the results database."""

    job_key: str
    run_id: int
    model_id: int
    resumed: bool  # planned before (a retried parent or a given job_key)
    completed: bool  # ... and already completed then


def open_job(
    sessions: sessionmaker[Session],
    checkpoint: Checkpoint,
    *,
    job_key: str,
    source: str,
    parameters: dict[str, Any],
    prefect_flow_run_id: str | None = None,
    stale_after: dt.timedelta | None = runs.STALE_RUN_AFTER,
) -> Job:
    """Register the model version and start the job's run, or reopen the run of a job planned
    before under the same key (which must use the same model version). Starting a run marks
    runs whose heartbeat is older than ``stale_after`` abandoned (see ``runs.start_run``)."""
    with sessions.begin() as session:
        model_id = runs.register_model(session, checkpoint.metadata(), checkpoint.sha256 or "")
        existing = store.job_run(session, job_key)
        if existing is not None:
            run_id, planned_model = existing
            if planned_model != model_id:
                raise store.ManifestError(
                    f"fan-out job {job_key!r} was planned with model {planned_model}, not "
                    f"{checkpoint.name!r} version {checkpoint.version!r} (model {model_id}); "
                    "start a new job for another model"
                )
            status = store.reopen_run(session, run_id)
            return Job(job_key, run_id, model_id, resumed=True, completed=status == "completed")
        run_id = runs.start_run(
            session,
            kind="reprocess",
            source=source,
            parameters=parameters,
            selection_policy=parameters.get("selection") or {},
            model_id=model_id,
            prefect_flow_run_id=prefect_flow_run_id,
            stale_after=stale_after,
        )
    return Job(job_key, run_id, model_id, resumed=False, completed=False)


def close_job(
    sessions: sessionmaker[Session],
    job: Job,
    *,
    counts: dict[str, int] | None = None,
    error: str | None = None,
    forget: bool = False,
) -> None:
    """Finish the job's run (completed, or failed with ``error``). A completed job's manifests
    lose their file lists; ``forget`` deletes the manifests (a plan that could not finish)."""
    if job.completed and error is None:
        return
    full = {k: 0 for k in (*store.OUTCOME_KEYS, "files_seen")}
    full.update(counts or {})
    with sessions.begin() as session:
        if forget:
            store.delete_job(session, job.job_key)
        runs.finish_run(session, job.run_id, "failed" if error else "completed", full, error)
        if error is None:
            store.compact_job(session, job.job_key)


def plan_job(
    sessions: sessionmaker[Session],
    *,
    job_key: str,
    sources: Sequence[str | os.PathLike[str]],
    run_id: int,
    model_id: int,
    parameters: dict[str, Any],
    manifest_size: int,
    spool_dir: str | os.PathLike[str] | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> list[store.Manifest]:
    """Discover the sources and store one manifest per ``manifest_size`` files (idempotent:
    planning the same job again returns the stored manifests, or refuses when the sources
    changed). Memory is bounded by one manifest."""
    planned: list[store.Manifest] = []
    records = file_records(sources, job_key=job_key, spool_dir=spool_dir, limits=limits)
    for index, files in enumerate(batches(records, manifest_size)):
        with sessions.begin() as session:
            manifest = store.add_manifest(
                session,
                job_key=job_key,
                shard_index=index,
                run_id=run_id,
                model_id=model_id,
                parameters=parameters,
                files=files,
            )
        planned.append(manifest)
    with sessions() as session:
        stored = store.job_manifests(session, job_key)
    if len(stored) != len(planned):
        raise store.ManifestError(
            f"fan-out job {job_key!r} has {len(stored)} stored manifests but the sources now "
            f"give {len(planned)}: the sources changed since the job started; start a new job"
        )
    return stored


# --- a worker: screen one manifest ------------------------------------------------------------


@dataclass
class ManifestResult:
    """What one worker did with one manifest (summed over its chunks)."""

    manifest: store.Manifest
    files: int = 0  # files this claim committed
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    already_done: bool = False  # the manifest was done before this claim


def check_worker(manifest: store.Manifest, checkpoint_sha256: str | None, hmac_key: bytes) -> None:
    """Refuse to screen with another model file or another patient-identifier key."""
    expected = manifest.parameters.get("model_sha256")
    if expected and checkpoint_sha256 != expected:
        raise FanoutMismatch(
            f"shard manifest {manifest.manifest_id} was planned for the model file with sha256 "
            f"{expected[:12]}..., but this worker loaded {str(checkpoint_sha256)[:12]}...: "
            "every worker must see the same checkpoint at the same path"
        )
    fingerprint = manifest.parameters.get("key_fingerprint")
    if fingerprint and key_fingerprint(hmac_key) != fingerprint:
        raise FanoutMismatch(
            "this worker's patient-identifier key differs from the one the fan-out job was "
            "planned with, so its patient hashes would not match the other workers': set the "
            "same CXR_SCREEN_HMAC_KEY on the parent and every worker"
        )


def check_job(manifest: store.Manifest, job_key: str | None) -> None:
    """Refuse a manifest of another job: the parent names its job, and a worker whose
    database is not the parent's would otherwise screen some other job's manifest."""
    if job_key is not None and manifest.job_key != job_key:
        raise FanoutMismatch(
            f"shard manifest {manifest.manifest_id} in this worker's results database belongs "
            f"to fan-out job {manifest.job_key!r}, not {job_key!r}: the worker's "
            "CXR_SCREEN_DATABASE_URL must name the database the job was planned in"
        )


def screen_manifest(
    engine: Engine,
    manifest_id: int,
    processor: ShardProcessor,
    *,
    hmac_key: bytes,
    worker: str,
    job_key: str | None = None,
    prefect_flow_run_id: str | None = None,
    on_chunk: Callable[[ManifestResult], None] | None = None,
    wrap_steps: Callable[[ShardSteps], Steps] | None = None,
) -> ManifestResult:
    """Claim a manifest and screen its remaining files, one transaction per chunk.

    The chunks go through the shard loop (``tasks/shard_loop.py``) as a screening run's
    shards do: plan (skip what the model version already predicted unless ``force``), header
    scan, selection and decoding in the processor's pool (each file read once) while the
    previous chunk is scored and the one before it written, then in ONE transaction: write the
    chunk, re-aggregate its studies, advance the manifest. A failure marks the claim failed
    (for the parent and the operator) and raises. ``on_chunk(result)`` is called after each
    commit; ``wrap_steps`` turns the loop's plain steps into others (Prefect tasks, in a flow).
    """
    sessions = session_factory(engine)
    with sessions() as session:
        check_job(store.get_manifest(session, manifest_id, with_files=False), job_key)
    with sessions.begin() as session:
        manifest = store.claim_manifest(
            session, manifest_id, worker=worker, prefect_flow_run_id=prefect_flow_run_id
        )
    result = ManifestResult(manifest, already_done=manifest.done)
    if manifest.done:
        return result
    try:
        check_worker(manifest, processor.checkpoint.sha256, hmac_key)
        p = manifest.parameters
        policy = SelectionPolicy.from_dict(p["selection"]) if p.get("selection") else None
        policy = policy or SelectionPolicy()
        remaining = (manifest.files or [])[manifest.files_done :]
        if len(remaining) != manifest.n_files - manifest.files_done:
            raise store.ManifestError(
                f"shard manifest {manifest_id} lists {len(manifest.files or [])} files but "
                f"expects {manifest.n_files}; its file list was removed or damaged"
            )
        progress = _ManifestProgress(result, manifest.attempts, manifest.files_done, on_chunk)
        run = RunContext.on(
            engine, processor.checkpoint, model_id=manifest.model_id, run_id=manifest.run_id
        )
        steps = ShardSteps(
            run,
            processor,
            force=bool(p.get("force", False)),
            aggregation=p.get("aggregation", "max"),
            then=progress.record,
        )
        request = ScanRequest(policy, hmac_key)  # the workers scan the files they read
        chunks = (
            [scan_item(from_record(r), policy, hmac_key, request) for r in chunk]
            for chunk in batches(remaining, int(p.get("shard_size", 256)))
        )
        ShardLoop(wrap_steps(steps) if wrap_steps else steps, progress.stored).run(chunks)
    except BaseException as exc:
        if not isinstance(exc, store.ManifestLost):
            _record_failure(sessions, manifest_id, manifest.attempts, exc)
        raise
    return result


@dataclass
class _ManifestProgress:
    """A claim's progress: recorded in each chunk's transaction, counted once it commits."""

    result: ManifestResult
    attempt: int  # the claim's token
    done: int  # files of the manifest committed so far
    on_chunk: Callable[[ManifestResult], None] | None = None
    _recorded: store.Manifest | None = None

    def record(self, session: Session, rows: ShardRows, written: ShardResult) -> None:
        """In the chunk's transaction (raises ``ManifestLost`` when the claim was lost)."""
        self._recorded = store.record_progress(
            session,
            self.result.manifest.manifest_id,
            attempt=self.attempt,
            files_done_before=self.done,
            files=rows.files,
            counts=rows.final_counts(written),
            study_uids=written.study_uids,
        )

    def stored(self, rows: ShardRows, counts: Counter, tally: Tally) -> None:
        """After the chunk's commit (writes are in order: the next one starts after this)."""
        self.done += rows.files
        if self._recorded is not None:
            self.result.manifest = self._recorded
        self.result.files, self.result.counts, self.result.reasons = (
            tally.files,
            Counter(tally.counts),
            Counter(tally.reasons),
        )
        if self.on_chunk is not None:
            self.on_chunk(self.result)


def _record_failure(
    sessions: sessionmaker[Session], manifest_id: int, attempt: int, exc: BaseException
) -> None:
    try:
        with sessions.begin() as session:
            store.fail_manifest(
                session, manifest_id, attempt=attempt, error=f"{type(exc).__name__}: {exc}"
            )
    except Exception as inner:  # the database may be what failed: keep the first error
        log.warning("could not mark shard manifest %d failed: %s", manifest_id, inner)
        exc.add_note(f"(marking shard manifest {manifest_id} failed also failed: {inner})")


# --- the parent: aggregate and sum up ---------------------------------------------------------


def split_study_uids(manifests: Sequence[store.Manifest]) -> list[str]:
    """Studies with predicted images from more than one manifest, sorted."""
    seen: Counter = Counter()
    for manifest in manifests:
        seen.update(set(manifest.study_uids))
    return sorted(uid for uid, n in seen.items() if n > 1)


def aggregate_studies(
    sessions: sessionmaker[Session],
    study_uids: Sequence[str],
    *,
    model_id: int,
    run_id: int,
    aggregation: str,
    force: bool,
    chunk: int = 5000,
) -> None:
    """Re-aggregate studies from all of their stored images, one transaction per ``chunk``.

    A worker aggregates a study when it commits the study's images, from what it can see:
    two workers committing images of one study at the same time can each miss the other's.
    Once every manifest is done, this pass fixes the studies split across manifests (the
    others were written by one worker, chunk after chunk, and are already right).
    """
    for part in batches(study_uids, chunk):
        with sessions.begin() as session:
            predictions.upsert_study_predictions(
                session, model_id, run_id, aggregation, part, force=force
            )


def finish_job(
    sessions: sessionmaker[Session],
    job: Job,
    *,
    aggregation: str,
    force: bool,
    spool_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[store.Manifest], dict[str, int], list[str]]:
    """Once every manifest is done: re-aggregate the studies split across manifests, close the
    run as completed and remove the job's spool. Returns the manifests, the job's counts and
    the split studies."""
    with sessions() as session:
        final = store.job_manifests(session, job.job_key)
    counts = job_counts(final)
    split = split_study_uids(final)
    aggregate_studies(
        sessions,
        split,
        model_id=job.model_id,
        run_id=job.run_id,
        aggregation=aggregation,
        force=force,
    )
    close_job(sessions, job, counts=counts)
    remove_spool(spool_dir, job.job_key)
    return final, counts, split


def fail_job(sessions: sessionmaker[Session], job: Job, exc: BaseException) -> None:
    """Close the job's run as failed with ``exc`` as the reason; its manifests keep the
    progress for a retry. If that fails too (the database may be what failed), it is noted on
    ``exc``, the error that matters."""
    try:
        with sessions() as session:
            so_far = job_counts(store.job_manifests(session, job.job_key))
        close_job(sessions, job, counts=so_far, error=f"{type(exc).__name__}: {exc}")
    except Exception as inner:
        exc.add_note(f"(closing run {job.run_id} as failed also failed: {inner})")


def job_counts(manifests: Sequence[store.Manifest]) -> dict[str, int]:
    counts = {k: 0 for k in store.OUTCOME_KEYS}
    for manifest in manifests:
        for k in store.OUTCOME_KEYS:
            counts[k] += int(manifest.counts.get(k, 0))
    counts["files_seen"] = sum(counts[k] for k in store.OUTCOME_KEYS)
    return counts
