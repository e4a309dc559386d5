"""Screening one shard: plan, decode in worker processes, infer in batches, persist.

Plain functions and one small class (:class:`ShardProcessor`, which owns the predictor and the
decode pool for a whole run). No Prefect here: ``flows/screen.py`` wraps these as tasks.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from model.checkpoint import Checkpoint
from model.predictor import Predictor
from sql import writes
from tasks.dicom.outcomes import Outcome
from tasks.ingest import Decoded, ScanItem, decode_item, decode_many, init_worker


@dataclass
class ShardRows:
    """The rows one shard writes, and its per-outcome counts for the run summary."""

    instances: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # predicted / skipped / failed
    already_done: int = 0  # selected files this model version had already predicted
    reasons: Counter = field(default_factory=Counter)  # skip and failure reasons
    decode_seconds: float = 0.0
    infer_seconds: float = 0.0

    @property
    def files(self) -> int:
        return sum(self.counts.values()) + self.already_done

    def final_counts(self, written: writes.ShardResult) -> Counter:
        """Counts for the run summary once the shard is stored: the database's outcome counts
        (a UID conflict turns a file into *failed*) plus the already-predicted files, which
        this run skipped without rewriting their rows."""
        counts = Counter({k: int(v) for k, v in written.outcome_counts.items()})
        counts[Outcome.SKIPPED.value] += self.already_done
        return counts


def header_instance(item: ScanItem, content_sha256: str) -> dict[str, Any]:
    """The instance row for a decoded file (header facts only; no raw identifiers)."""
    h = item.header
    assert h is not None
    return {
        "sop_instance_uid": h.sop_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "series_instance_uid": h.series_instance_uid,
        "source_uri": item.uri,
        "content_sha256": content_sha256,
        "modality": h.modality,
        "body_part": h.body_part_examined,
        "view_position": h.view_position,
        "photometric_interpretation": h.photometric_interpretation,
        "rows": h.rows,
        "columns": h.columns,
        "bits_stored": h.bits_stored,
        "pixel_representation": h.pixel_representation,
        "number_of_frames": h.number_of_frames,
        "transfer_syntax_uid": h.transfer_syntax_uid,
        "study_date": h.study_date,
        "accession_number": h.accession_number,
        "patient_id_hash": h.patient_id_hash,
    }


def _outcome(item: ScanItem, outcome: Outcome, reason: str | None, **extra: Any) -> dict[str, Any]:
    h = item.header
    return {
        "source_uri": item.uri,
        "outcome": outcome.value,
        "reason": reason,
        "sop_instance_uid": h.sop_instance_uid if h else None,
        "study_instance_uid": h.study_instance_uid if h else None,
        **extra,
    }


def already_predicted_reason(checkpoint: Checkpoint) -> str:
    return (
        f"already predicted by model {checkpoint.name!r} version {checkpoint.version!r}; "
        "use --force to recompute"
    )


class ShardProcessor:
    """Decodes shards in a spawn-context process pool and scores them in batches.

    ``workers=0`` decodes in this process (simplest, for small jobs and tests).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str = "auto",
        workers: int | None = None,
        batch_size: int | None = None,
        reduced: bool = True,
        thumbnails_dir: str | Path | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.predictor = Predictor(checkpoint, device=device)
        if batch_size:
            self.predictor.batch_size = batch_size
        self.workers = default_workers(self.predictor.device.type) if workers is None else workers
        self.reduced = reduced
        self.thumbnails_dir = str(thumbnails_dir) if thumbnails_dir else None
        self.spec_dict = checkpoint.preprocessing.to_dict()
        self.spec_sha256 = checkpoint.preprocessing.sha256
        self._pool: ProcessPoolExecutor | None = None
        self._threads_before: int | None = None

    def __enter__(self) -> ShardProcessor:
        if self.workers > 0:
            self._pool = self._new_pool()
            self._threads_before = limit_inference_threads(self.predictor, self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def _args(self, items: list[ScanItem]) -> list[tuple]:
        return [
            (
                it.source,
                it.header.sop_instance_uid,
                self.spec_dict,
                self.reduced,
                self.thumbnails_dir,
            )
            for it in items
            if it.header is not None
        ]

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
        )

    def _restart_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def _decode_isolated(self, a: tuple) -> Decoded:
        """Decode one file alone; a file that kills its worker twice is failed, not retried."""
        for attempt in range(2):
            try:
                assert self._pool is not None
                return self._pool.submit(decode_item, *a).result()
            except BrokenProcessPool:
                self._restart_pool()
                if attempt == 1:
                    return Decoded(
                        a[0].uri,
                        error="decoding crashed the worker process twice (a codec fault or "
                        "the memory limit); the file was not decoded",
                    )
        raise AssertionError("unreachable")

    def submit(self, items: list[ScanItem], skip_uids: set[str] = frozenset()) -> PendingShard:
        """Classify a shard's files and start decoding the selected ones in the pool.

        Returns at once, so that the caller can infer and persist the previous shard while
        the workers decode this one. ``skip_uids``: SOP Instance UIDs this model version
        already predicted; those files are counted as skipped in the run and their stored
        rows are left untouched.
        """
        rows = ShardRows()
        todo: list[ScanItem] = []
        for item in items:
            if item.outcome is not None:
                rows.outcomes.append(_outcome(item, item.outcome, item.reason))
                rows.counts[item.outcome.value] += 1
                rows.reasons[item.reason or ""] += 1
            elif item.header is not None and item.header.sop_instance_uid in skip_uids:
                rows.already_done += 1
                rows.reasons[already_predicted_reason(self.checkpoint)] += 1
            else:
                todo.append(item)
        args = self._args(todo)
        futures: list[Future] = []
        if self._pool is not None and args:
            # a few chunks per worker: little IPC overhead, and the load still balances
            size = max(1, -(-len(args) // (self.workers * 4)))
            futures = [
                self._pool.submit(decode_many, args[i : i + size])
                for i in range(0, len(args), size)
            ]
        return PendingShard(rows, todo, args, futures, time.perf_counter())

    def collect(self, pending: PendingShard) -> ShardRows:
        """Wait for a shard's decoding, score its images in batches, build its rows."""
        rows, todo = pending.rows, pending.todo
        if self._pool is None:
            decoded = [decode_item(*a) for a in pending.args]
        else:
            try:
                decoded = [d for f in pending.futures for d in f.result()]
            except BrokenProcessPool:
                # A decoder crashed its process (a codec fault, the OOM killer): find the
                # file(s) responsible one at a time in a fresh pool; the others still decode.
                self._restart_pool()
                decoded = [self._decode_isolated(a) for a in pending.args]
        ready: list[tuple[ScanItem, Decoded]] = []
        for item, dec in zip(todo, decoded, strict=True):
            if dec.error is not None:
                rows.outcomes.append(_outcome(item, Outcome.FAILED, dec.error))
                rows.counts[Outcome.FAILED.value] += 1
                rows.reasons[dec.error] += 1
            else:
                ready.append((item, dec))
        rows.decode_seconds = time.perf_counter() - pending.submitted
        if not ready:
            return rows
        started = time.perf_counter()
        scores = self.predictor.predict(np.stack([dec.image for _, dec in ready]))
        rows.infer_seconds = time.perf_counter() - started
        threshold = float(self.checkpoint.threshold)
        for (item, dec), score in zip(ready, scores, strict=True):
            h = item.header
            assert h is not None
            rows.instances.append(header_instance(item, dec.content_sha256 or ""))
            rows.outcomes.append(
                _outcome(
                    item,
                    Outcome.PREDICTED,
                    None,
                    content_sha256=dec.content_sha256,
                    facts=dec.facts,
                    thumbnail_path=dec.thumbnail_path,
                )
            )
            rows.predictions.append(
                {
                    "source_uri": item.uri,
                    "sop_instance_uid": h.sop_instance_uid,
                    "study_instance_uid": h.study_instance_uid,
                    "score": float(score),
                    "label": bool(score >= threshold),
                    "threshold": threshold,
                    "preprocessing_sha256": self.spec_sha256,
                }
            )
            rows.counts[Outcome.PREDICTED.value] += 1
        return rows

    def process(self, items: list[ScanItem], skip_uids: set[str] = frozenset()) -> ShardRows:
        """Outcome rows for every file of the shard and predictions for the selected ones."""
        return self.collect(self.submit(items, skip_uids))


@dataclass
class PendingShard:
    """A shard whose decoding is under way in the pool (see ``ShardProcessor.submit``)."""

    rows: ShardRows
    todo: list[ScanItem]
    args: list[tuple]
    futures: list[Future]
    submitted: float


def limit_inference_threads(predictor: Predictor, workers: int) -> int | None:
    """On the CPU, leave the cores the decode workers use to them; returns the old setting.

    Inference gets the cores the workers do not use plus this process's own (it sleeps while
    it waits for a shard): ``cores - workers + 1``, at least one. torch's intra-op threads spin
    while they wait for each other, so beside busy decode processes a thread that loses its
    core stalls the others. Measured on 2 cores (2000 px, 2 workers, 240 images): with torch's
    default of 2 threads inference used 7.2 s of CPU and the pool ran at 28 images/s; with
    one thread, 2.8 s and 37 images/s.
    """
    if predictor.device.type != "cpu":
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, available_cores() - workers + 1))
    return before


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def inference_cores(cores: int) -> int:
    """Cores to leave to CPU inference: one in five, at least one.

    From the costs measured on the 2-core machine for a 2000 px radiograph: ~25 ms of a core
    to read, hash, window and resize it in a worker, ~6.5 ms to score it on one thread (batch
    8). On 2 cores this gives the split measured best there; above that it is reasoned from
    those costs, not measured (smaller images shift the balance towards inference: set
    ``--workers`` lower).
    """
    return max(1, round(cores / 5))


def default_workers(device_type: str = "cpu") -> int:
    """Decode processes: with a GPU one per core; on the CPU, the cores ``inference_cores``
    does not keep, plus one (this process sleeps while it waits for a shard).

    Measured on 2 cores (LGMobileNetV2 on the CPU, one inference thread; 240 images of
    2000 px, no thumbnails): 30 images/s with one worker, 37 with two, 35 with three.
    """
    cores = available_cores()
    if device_type != "cpu":
        return cores
    return max(1, cores - inference_cores(cores) + 1)


def plan_skips(
    readers: sessionmaker[Session], model_id: int, items: list[ScanItem], force: bool
) -> set[str]:
    """SOP Instance UIDs in ``items`` this model version already predicted (none with force)."""
    if force:
        return set()
    uids = [it.header.sop_instance_uid for it in items if it.selected and it.header is not None]
    if not uids:
        return set()
    with readers() as session:
        return writes.predicted_sop_uids(session, model_id, uids)


def persist_shard(
    sessions: sessionmaker[Session],
    *,
    run_id: int,
    model_id: int,
    rows: ShardRows,
    force: bool,
    aggregation: str = "max",
) -> writes.ShardResult:
    """Write a shard and re-aggregate its studies in ONE transaction.

    A crash before the commit leaves nothing of the shard; after it, the shard and its study
    predictions are both there, and the run's heartbeat is fresh. A UID conflict turns a file
    into *failed*: the returned counts are the ones to add to the run summary.
    """
    with sessions.begin() as session:
        result = writes.write_shard(
            session,
            run_id=run_id,
            model_id=model_id,
            instances=rows.instances,
            outcomes=rows.outcomes,
            predictions=rows.predictions,
            force=force,
        )
        if result.study_uids:
            writes.upsert_study_predictions(
                session, model_id, run_id, aggregation, sorted(result.study_uids), force=force
            )
    return result


@dataclass
class RunContext:
    """What one screening run holds open: the database, the checkpoint and the run's ids."""

    engine: Any
    sessions: sessionmaker[Session]
    readers: sessionmaker[Session]  # read-only: on SQLite they never take the write lock
    checkpoint: Checkpoint
    model_id: int
    run_id: int
    started: float = field(default_factory=time.perf_counter)


def open_run(
    database_url: str,
    checkpoint: Checkpoint,
    *,
    kind: str,
    source: str,
    parameters: dict[str, Any],
    selection_policy: dict[str, Any],
    prefect_flow_run_id: str | None = None,
    stale_after: dt.timedelta | None = writes.STALE_RUN_AFTER,
) -> RunContext:
    """Migrate the database if needed, register the model version and record the run.

    Recording the run also marks ``abandoned`` the runs still ``running`` whose heartbeat is
    older than ``stale_after`` (killed runs; None: not checked). Each committed shard
    (``persist_shard``) is the run's heartbeat.
    """
    from sql.db import connect, session_factory

    engine = connect(database_url)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        model_id = writes.register_model(session, checkpoint.metadata(), checkpoint.sha256 or "")
    with sessions.begin() as session:
        run_id = writes.start_run(
            session,
            kind=kind,
            source=source,
            parameters=parameters,
            selection_policy=selection_policy,
            model_id=model_id,
            prefect_flow_run_id=prefect_flow_run_id,
            stale_after=stale_after,
        )
    readers = session_factory(engine, read_only=True)
    return RunContext(engine, sessions, readers, checkpoint, model_id, run_id)


def close_run(ctx: RunContext, counts: Counter, error: str | None = None) -> None:
    status = "failed" if error else "completed"
    full = {k: int(counts.get(k, 0)) for k in ("predicted", "skipped", "failed")}
    full["files_seen"] = sum(full.values())
    try:
        with ctx.sessions.begin() as session:
            writes.finish_run(session, ctx.run_id, status, full, error)
    finally:
        ctx.engine.dispose()  # the run is over: return its connections


def read_watermark(database_url: str, name: str):
    """The watermark's time (aware UTC datetime) or None when never set."""
    from sql.db import connect, session_factory

    engine = connect(database_url)
    try:
        with session_factory(engine, read_only=True)() as session:
            mark = writes.get_watermark(session, name)
    finally:
        engine.dispose()
    return mark.value if mark else None


def write_watermark(database_url: str, name: str, value, run_id: int) -> None:
    from sql.db import connect, session_factory

    engine = connect(database_url)
    try:
        with session_factory(engine).begin() as session:
            writes.set_watermark(session, name, value, {"run_id": run_id}, run_id=run_id)
    finally:
        engine.dispose()
