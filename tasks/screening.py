"""Screening shards: plan, decode in worker processes, infer in batches, persist.

Plain functions and one class, :class:`ShardProcessor`, which owns the predictor and the decode
pool for a whole run. The run's engine belongs to its caller (the flow opens it once and passes
it in); nothing here creates one. No Prefect here: ``tasks/shard_loop.py`` runs these steps
shard after shard, and ``tasks/prefect_tasks.py`` wraps them as Prefect tasks.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from model.checkpoint import Checkpoint
from model.predictor import Predictor
from sql import predictions, runs, shards
from sql.db import session_factory
from sql.predictions import StoredIdentity
from sql.rows import fingerprint_scheme
from tasks import decode_pool
from tasks.decode_pool import DecodeJob, DecodePool, default_workers
from tasks.dicom import fingerprint
from tasks.dicom.headers import InstanceHeader
from tasks.dicom.outcomes import Outcome
from tasks.ingest import (
    NO_HEADER_REASON,
    THUMBNAIL_SIZE,
    Decoded,
    Rule,
    ScanItem,
    WorkerScan,
    call_arguments,
    fingerprint_rule,
)
from tasks.interrupts import held, signal_name

#: Shards whose UIDs ``ShardProcessor.submit`` remembers: the writes of the shards just before
#: may not have committed when a shard is planned, so the database cannot tell of them yet.
RECENT_SHARDS = 2


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
    # Studies this shard must not aggregate (a PACS study found partial: aggregated by the run
    # that completes it)
    held_studies: set[str] = field(default_factory=set)

    @property
    def files(self) -> int:
        return sum(self.counts.values()) + self.already_done

    def final_counts(self, written: shards.ShardResult) -> Counter:
        """Counts for the run summary once the shard is stored: the database's outcome counts
        (a UID conflict turns a file into *failed*) plus the already-predicted files, which
        this run skipped without rewriting their rows."""
        counts = Counter({k: int(v) for k, v in written.outcome_counts.items()})
        counts[Outcome.SKIPPED.value] += self.already_done
        return counts

    def add(self, item: ScanItem, outcome: Outcome, reason: str | None, **extra: Any) -> None:
        """One file's outcome row, counted (a reason for a skipped or failed file)."""
        self.outcomes.append(_outcome(item, outcome, reason, **extra))
        self.counts[outcome.value] += 1
        if outcome != Outcome.PREDICTED:
            self.reasons[reason or ""] += 1


def header_instance(uri: str, h: InstanceHeader, content_sha256: str) -> dict[str, Any]:
    """The instance row for a decoded file (header facts only; no raw identifiers)."""
    return {
        "sop_instance_uid": h.sop_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "series_instance_uid": h.series_instance_uid,
        "source_uri": uri,
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


@dataclass
class PendingShard:
    """A shard whose decoding is under way in the pool (see ``ShardProcessor.submit``)."""

    rows: ShardRows
    # the selected files being decoded (the header None: the worker scans the file)
    todo: list[tuple[ScanItem, InstanceHeader | None]]
    job: DecodeJob
    submitted: float
    args: list[tuple] = field(default_factory=list)  # decode_item's, one tuple per file of todo


class ShardProcessor:
    """Decodes shards in the decode pool (``tasks/decode_pool.py``) and scores them in batches.

    ``workers=0`` decodes in this process (simplest, for small jobs and tests); None: the
    default for the device (``decode_pool.default_workers``).
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
        self._pool: DecodePool | None = None
        self._threads_before: int | None = None
        # The UIDs of the shards submitted just before (their writes may be in flight).
        self._recent_uids: deque[frozenset[str]] = deque(maxlen=RECENT_SHARDS)
        # The UIDs of the shards collected just before (files scanned by the workers are
        # known only then)
        self._collected_uids: deque[frozenset[str]] = deque(maxlen=RECENT_SHARDS)

    def __enter__(self) -> ShardProcessor:
        self._pool = DecodePool(self.workers)
        if self.workers > 0:
            self._threads_before = limit_inference_threads(self.predictor, self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    @property
    def pool(self) -> DecodePool:
        if self._pool is None:
            raise RuntimeError("the shard processor is not open: use it in a `with` block")
        return self._pool

    def submit(self, items: list[ScanItem], skip: ShardPlan | None = None) -> PendingShard:
        """Classify a shard's files and start decoding the selected ones in the pool.

        Returns at once, so that the caller can infer and persist the previous shard while
        the workers decode this one. ``skip`` (``plan_skips``): the source files this model
        version already predicted from those very files; they are counted as skipped in the
        run and their stored rows are left untouched. A file whose SOP Instance UID may have
        been seen before (stored, twice in this shard, or in the shards just before it, whose
        writes may not have committed yet) is decoded with both content fingerprints, so that
        the writer can compare it with the other copy whatever kind that one has, unless it
        has the stored copy's content hash (``ShardPlan``).
        """
        skip = skip if skip is not None else ShardPlan()
        rows = ShardRows()
        todo: list[tuple[ScanItem, InstanceHeader | None]] = []
        for item in items:
            if item.deferred is not None:
                todo.append((item, None))
            elif item.outcome is not None:
                rows.add(item, item.outcome, item.reason)
            elif item.header is None:  # scan_file never leaves a selected file without one
                rows.add(item, Outcome.FAILED, NO_HEADER_REASON)
            elif item.uri in skip:
                rows.already_done += 1
                rows.reasons[already_predicted_reason(self.checkpoint)] += 1
            else:
                todo.append((item, item.header))
        uids = [h.sop_instance_uid for _, h in todo if h is not None]
        # UIDs whose other copy is not in the database yet: twice in this shard, or in the
        # shards just before (no stored content hash to compare with: both fingerprints)
        unsettled = {u for u, n in Counter(uids).items() if n > 1}
        unsettled |= set().union(*self._recent_uids, *self._collected_uids)
        self._recent_uids.append(frozenset(uids))
        args = [self._arguments(item, h, skip, unsettled) for item, h in todo]
        return PendingShard(rows, todo, self.pool.start(args), time.perf_counter(), args)

    def _arguments(
        self, item: ScanItem, h: InstanceHeader | None, skip: ShardPlan, unsettled: set[str]
    ) -> tuple:
        """``decode_item``'s arguments for one file (see ``submit``)."""
        common = (self.spec_dict, self.reduced, self.thumbnails_dir, THUMBNAIL_SIZE)
        if h is None:
            assert item.deferred is not None
            scan = WorkerScan(
                item.deferred,
                skip.predicted_at.get(item.uri),
                {
                    u: tuple(skip.stored[u])
                    for u in skip.known_at.get(item.uri, ())
                    if u in skip.stored
                },
            )
            return (item.source, None, *common, False, fingerprint.PIXELS, None, scan)
        uid = h.sop_instance_uid
        rule = fingerprint_rule(skip.stored.get(uid), uid in unsettled)
        return (item.source, uid, *common, *rule)

    def collect(self, pending: PendingShard, lookup: StoredLookup | None = None) -> ShardRows:
        """Wait for a shard's decoding, score its images in batches, build its rows.

        ``lookup`` (``sop_uids -> {uid: StoredIdentity}``, the database now): files whose
        identity was not known when they were sent to the workers (scanned by a worker, or
        sharing a UID with a file of the shard just before, scanned by its worker) are checked
        against it, and those that turn out to be another file's copy get the fingerprint
        that file's can be compared with (``_settle_copies``).
        """
        rows = pending.rows
        ready: list[tuple[ScanItem, InstanceHeader, Decoded, tuple]] = []
        decoded = self.pool.results(pending.job)
        for (item, h), dec, args in zip(pending.todo, decoded, pending.args, strict=True):
            if item.deferred is not None:
                item = ScanItem(item.source, dec.header, dec.scan_outcome, dec.scan_reason)
                if dec.scan_outcome is not None:
                    rows.add(item, dec.scan_outcome, dec.scan_reason)
                    continue
                if dec.already_done:
                    rows.already_done += 1
                    rows.reasons[already_predicted_reason(self.checkpoint)] += 1
                    continue
                h = dec.header
            if dec.error is not None or dec.image is None or h is None:
                rows.add(item, Outcome.FAILED, dec.error or "decoding returned no image")
            else:
                ready.append((item, h, dec, args))
        if lookup is not None:
            self._settle_copies(ready, lookup)
        self._collected_uids.append(frozenset(h.sop_instance_uid for _, h, _, _ in ready))
        rows.decode_seconds = time.perf_counter() - pending.submitted
        if not ready:
            return rows
        started = time.perf_counter()
        scores = self.predictor.predict(np.stack([dec.image for _, _, dec, _ in ready]))
        rows.infer_seconds = time.perf_counter() - started
        threshold = float(self.checkpoint.threshold)
        for (item, h, dec, _), score in zip(ready, scores, strict=True):
            instance = header_instance(item.uri, h, dec.content_sha256 or "")
            rows.instances.append(instance | dec.fingerprints())
            rows.add(
                item,
                Outcome.PREDICTED,
                None,
                content_sha256=dec.content_sha256,
                facts=dec.facts,
                thumbnail_path=dec.thumbnail_path,
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
        return rows

    def _settle_copies(
        self, ready: list[tuple[ScanItem, InstanceHeader, Decoded, tuple]], lookup: StoredLookup
    ) -> None:
        """Give each decoded file the fingerprints it would have had if its UID's history had
        been known when it was sent to the workers (``submit``'s rule, with the database now
        and the shards collected just before): a file that turns out to share its UID with a
        stored instance or a file in flight, and lacks the fingerprint they can be compared
        with (or has a pixel fingerprint of another kind), is fingerprinted again in the pool
        (a copy: rare; the file is read a second time). Its model input stays as decoded."""
        uids = Counter(h.sop_instance_uid for _, h, _, _ in ready)
        unsettled = {u for u, n in uids.items() if n > 1}
        unsettled |= set().union(*self._collected_uids)
        stored = lookup(list(uids))
        again: list[tuple[Decoded, tuple]] = []
        for item, h, dec, args in ready:
            uid = h.sop_instance_uid
            want = fingerprint_rule(stored.get(uid), uid in unsettled)
            if _lacks(dec, want, _used(args, uid)):
                again.append(
                    (
                        dec,
                        (
                            item.source,
                            uid,
                            self.spec_dict,
                            self.reduced,
                            None,
                            THUMBNAIL_SIZE,
                            *want,
                        ),
                    )
                )
        if not again:
            return
        for (dec, _), redo in zip(again, self.pool.decode_all([a for _, a in again]), strict=True):
            if redo.error is not None:
                dec.facts["fingerprint_error"] = (
                    f"the copy's second fingerprint failed: {redo.error}"
                )
                continue
            dec.content_sha256 = redo.content_sha256
            dec.pixel_fingerprint = redo.pixel_fingerprint
            dec.codestream_fingerprint = redo.codestream_fingerprint
            if "fingerprint_error" in redo.facts:
                dec.facts["fingerprint_error"] = redo.facts["fingerprint_error"]

    def process(self, items: list[ScanItem], skip: ShardPlan | None = None) -> ShardRows:
        """Outcome rows for every file of the shard and predictions for the selected ones."""
        return self.collect(self.submit(items, skip))


StoredLookup = Callable[[list[str]], dict[str, StoredIdentity]]
"""``lookup(sop_uids)``: the stored identity of those of ``sop_uids`` stored as instances."""


def _used(args: tuple, uid: str) -> Rule:
    """The rule a worker applied to a file (``decode_item``'s arguments, or its ``scan``)."""
    named = call_arguments(args)
    if named["scan"] is not None:
        return fingerprint_rule(named["scan"].stored.get(uid))
    return named["both_fingerprints"], named["pixel_kind"], named["stored_content_sha256"]


def _lacks(dec: Decoded, want: Rule, used: Rule) -> bool:
    """Whether the rule ``want`` would have given ``dec`` a fingerprint the rule ``used`` did
    not: the other kind (computed when the content hash differs from the stored one), or a
    pixel fingerprint of another kind."""
    if want[0] and dec.pixel_fingerprint and fingerprint_scheme(dec.pixel_fingerprint) != want[1]:
        return True

    def other(rule: Rule) -> bool:
        return rule[0] and dec.content_sha256 != rule[2]

    return other(want) and not other(used)


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
    torch.set_num_threads(max(1, decode_pool.available_cores() - workers + 1))
    return before


# --- the run in the database ---------------------------------------------------------------


@dataclass
class RunContext:
    """One screening run in the results database: where it writes, the checkpoint, its ids.

    The sessions are bound to the caller's engine, which outlives the run.
    """

    sessions: sessionmaker[Session]
    readers: sessionmaker[Session]  # read-only: on SQLite they never take the write lock
    checkpoint: Checkpoint
    model_id: int
    run_id: int
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def on(cls, engine: Engine, checkpoint: Checkpoint, *, model_id: int, run_id: int):
        """A run recorded before (e.g. a fan-out job's), on ``engine``."""
        readers = session_factory(engine, read_only=True)
        return cls(session_factory(engine), readers, checkpoint, model_id, run_id)


def open_run(
    engine: Engine,
    checkpoint: Checkpoint,
    *,
    kind: str,
    source: str,
    parameters: dict[str, Any],
    selection_policy: dict[str, Any],
    prefect_flow_run_id: str | None = None,
    stale_after: dt.timedelta | None = runs.STALE_RUN_AFTER,
) -> RunContext:
    """Register the model version and record the run, on the caller's (migrated) engine.

    Recording the run also marks ``abandoned`` the runs still ``running`` whose heartbeat is
    older than ``stale_after`` (killed runs; None: not checked). Each committed shard
    (``persist_shard``) is the run's heartbeat.
    """
    sessions = session_factory(engine)
    with held(), sessions.begin() as session:
        model_id = runs.register_model(session, checkpoint.metadata(), checkpoint.sha256 or "")
    with held(), sessions.begin() as session:
        run_id = runs.start_run(
            session,
            kind=kind,
            source=source,
            parameters=parameters,
            selection_policy=selection_policy,
            model_id=model_id,
            prefect_flow_run_id=prefect_flow_run_id,
            stale_after=stale_after,
        )
    return RunContext.on(engine, checkpoint, model_id=model_id, run_id=run_id)


def close_run(
    run: RunContext, counts: Counter, error: str | None = None, *, interrupted_by: int | None = None
) -> str | None:
    """Close the run with the counts of its committed shards: ``completed``, ``failed`` with
    ``error``, or ``interrupted`` by the signal ``interrupted_by`` (SIGINT, SIGTERM). Call it
    once the last shard has committed or rolled back (``ShardLoop.run`` returns or raises only
    then), the same way for every ending: the run's counts then equal its committed rows.
    Returns the error recorded. Stop signals are held while it writes."""
    full = {k: int(counts.get(k, 0)) for k in ("predicted", "skipped", "failed")}
    full["files_seen"] = sum(full.values())
    with held(), run.sessions.begin() as session:
        if interrupted_by is not None:
            return runs.interrupt_run(session, run.run_id, full, signal_name(interrupted_by))
        runs.finish_run(session, run.run_id, "failed" if error else "completed", full, error)
    return error


class ShardPlan(frozenset):
    """The planner's answer for a shard: the source URIs this model version already predicted
    from those very files (the set itself: skipped without decoding), and ``stored``, the SOP
    Instance UIDs of the shard already stored as instances with what identifies their content
    (``sql.predictions.StoredIdentity``). A file with such a UID may be a copy, in another
    encoding, of an instance predicted from another file: it is decoded, and the writer
    compares their content (``sql.shards``). The worker is given the stored content hash: a
    file that has it (the same file screened again, by another model version say) needs no
    second fingerprint; any other gets one that the stored instance's can be compared with,
    in the stored pixel kind (``px1`` for instances stored before 2026-11-29).

    For files not scanned yet (``ScanItem.deferred``), the planner answers by source URI:
    ``predicted_at``, the UID this model version predicted from each URI (the worker that
    reads the file skips it when it still has that UID), and ``known_at``, the UIDs any model
    version recorded at each URI (their identities are in ``stored``)."""

    stored: dict[str, StoredIdentity]
    predicted_at: dict[str, str]
    known_at: dict[str, tuple[str, ...]]

    def __new__(
        cls,
        skip: Iterable[str] = (),
        stored: dict[str, StoredIdentity] | None = None,
        predicted_at: dict[str, str] | None = None,
        known_at: dict[str, tuple[str, ...]] | None = None,
    ) -> ShardPlan:
        plan = super().__new__(cls, skip)
        plan.stored = dict(stored or {})
        plan.predicted_at = dict(predicted_at or {})
        plan.known_at = dict(known_at or {})
        return plan

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardPlan, (tuple(self), self.stored, self.predicted_at, self.known_at))


def plan_skips(
    readers: sessionmaker[Session], model_id: int, items: list[ScanItem], force: bool
) -> ShardPlan:
    """Which selected files of ``items`` this model version already predicted from the same
    file (none with ``force``), and which of their UIDs are stored; for files not scanned yet,
    the same by source URI (``ShardPlan``)."""
    files = [(it.uri, it.header.sop_instance_uid) for it in items if it.selected and it.header]
    deferred = [it.uri for it in items if it.deferred is not None]
    if not files and not deferred:
        return ShardPlan()
    with readers() as session:
        done = (
            set() if force or not files else predictions.predicted_files(session, model_id, files)
        )
        at = predictions.recorded_at(session, model_id, deferred) if deferred else None
        known_at = at.uids if at else {}
        uids = [uid for _, uid in files] + [u for found in known_at.values() for u in found]
        return ShardPlan(
            done,
            predictions.stored_uids(session, uids),
            {} if force or at is None else at.predicted,
            known_at,
        )


def stored_lookup(readers: sessionmaker[Session]) -> StoredLookup:
    """``ShardProcessor.collect``'s ``lookup`` on the run's database."""

    def lookup(sop_uids: list[str]) -> dict[str, StoredIdentity]:
        with readers() as session:
            return predictions.stored_uids(session, sop_uids)

    return lookup


InTransaction = Callable[[Session, ShardRows, shards.ShardResult], None]
"""``then(session, rows, written)``: more work in a shard's transaction (a fan-out manifest's
progress), after its rows are written."""


def persist_shard(
    sessions: sessionmaker[Session],
    *,
    run_id: int,
    model_id: int,
    rows: ShardRows,
    force: bool,
    aggregation: str = "max",
    then: InTransaction | None = None,
) -> shards.ShardResult:
    """Write a shard and re-aggregate its studies in ONE transaction (with ``then``'s work).

    A crash before the commit leaves nothing of the shard; after it, the shard and its study
    predictions are both there, and the run's heartbeat is fresh. A UID conflict turns a file
    into *failed*: ``rows.final_counts(result)`` are the counts to add to the run summary.
    """
    with sessions.begin() as session:
        result = shards.write_shard(
            session,
            run_id=run_id,
            model_id=model_id,
            instances=rows.instances,
            outcomes=rows.outcomes,
            predictions=rows.predictions,
            force=force,
        )
        studies = sorted(set(result.study_uids) - rows.held_studies)
        if studies:
            predictions.upsert_study_predictions(
                session, model_id, run_id, aggregation, studies, force=force
            )
        if then is not None:
            then(session, rows, result)
    return result


# --- the nightly watermark -------------------------------------------------------------------


def read_watermark(engine: Engine, name: str) -> dt.datetime | None:
    """The watermark's time (aware UTC datetime) or None when never set."""
    with session_factory(engine, read_only=True)() as session:
        mark = runs.get_watermark(session, name)
    return mark.value if mark else None


def write_watermark(engine: Engine, name: str, value: dt.datetime, run_id: int) -> None:
    with session_factory(engine).begin() as session:
        runs.set_watermark(session, name, value, {"run_id": run_id}, run_id=run_id)
