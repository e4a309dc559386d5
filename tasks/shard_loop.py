"""The shard loop: the one double-buffered path every screening run takes, shard after shard.

While the decode workers decode shard N+1, this process scores shard N, and shard N-1 is
written to the database in a background thread: the pool, the model and the database all work
at once. Writes stay in order (shard N's write starts once N-1's has committed), so a run's
progress in the database is always a prefix of its shards.

The loop knows four steps (:class:`ShardSteps`): *plan* (which files this model version already
predicted), *start* (classify and start decoding; returns at once), *score* (wait for the
decoding, infer) and *persist* (start the write; returns a future). ``ShardSteps`` does them
with plain calls and a one-thread writer; ``tasks.prefect_tasks.TaskSteps`` does the same as
Prefect tasks (the write in the flow's task-runner thread). The ``screen`` flow and a fan-out
worker's manifest (``tasks.manifests.screen_manifest``) both run this loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tasks.ingest import ScanItem
from tasks.interrupts import held, note, signal_of
from tasks.screening import (
    InTransaction,
    PendingShard,
    RunContext,
    ShardProcessor,
    ShardRows,
    persist_shard,
    plan_skips,
    stored_lookup,
)

T = TypeVar("T")


class Pending(Protocol[T]):
    """What ``persist`` returns: a ``concurrent.futures.Future`` or a ``PrefectFuture``."""

    def result(self) -> T: ...


class Steps(Protocol):
    def plan(self, items: list[ScanItem]) -> set[str]: ...
    def start(self, items: list[ScanItem], skip: set[str]) -> PendingShard: ...
    def score(self, pending: PendingShard) -> ShardRows: ...
    def persist(self, rows: ShardRows) -> Pending[Counter]: ...
    def close(self) -> None: ...


@dataclass
class ShardSteps:
    """The steps of one shard as plain calls, for ``run`` on ``processor``.

    ``then``: more work in each shard's write transaction (a fan-out manifest's progress).
    Writes run in a one-thread executor, started on the first write (``close`` ends it).
    """

    run: RunContext
    processor: ShardProcessor
    force: bool = False
    aggregation: str = "max"
    then: InTransaction | None = None
    _writer: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def plan(self, items: list[ScanItem]) -> set[str]:
        return plan_skips(self.run.readers, self.run.model_id, items, self.force)

    def start(self, items: list[ScanItem], skip: set[str]) -> PendingShard:
        return self.processor.submit(items, skip)

    def score(self, pending: PendingShard) -> ShardRows:
        return self.processor.collect(pending, stored_lookup(self.run.readers))

    def write(self, rows: ShardRows) -> Counter:
        """Write the shard (one transaction); the counts to add to the run's."""
        written = persist_shard(
            self.run.sessions,
            run_id=self.run.run_id,
            model_id=self.run.model_id,
            rows=rows,
            force=self.force,
            aggregation=self.aggregation,
            then=self.then,
        )
        return rows.final_counts(written)

    def persist(self, rows: ShardRows) -> Future[Counter]:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        return self._writer.submit(self.write, rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None


@dataclass
class Tally:
    """What the stored shards of a run add up to."""

    files: int = 0
    counts: Counter = field(default_factory=Counter)  # predicted / skipped / failed
    reasons: Counter = field(default_factory=Counter)  # why files were skipped or failed

    def add(self, rows: ShardRows, counts: Counter) -> None:
        self.files += rows.files
        self.counts += counts
        self.reasons += rows.reasons


Stored = Callable[[ShardRows, Counter, Tally], None]
"""``on_stored(rows, counts, tally)``: called in the loop's thread after each shard's commit."""


class ShardLoop:
    """Runs ``steps`` over shards, double-buffered; ``tally`` holds what has been stored
    (also after a failure or an interruption, for the run's record).

    Whatever ends the loop (the last shard, an error, SIGINT or SIGTERM), it returns or raises
    only once the write in flight has committed or rolled back: the caller then closes the run
    with ``tally``, which counts exactly the shards that committed. The bookkeeping of a
    commit and the hand-over of a shard to the writer are done with stop signals held
    (``tasks.interrupts.held``), so that a signal never counts a shard twice or loses a write.
    """

    def __init__(self, steps: Steps, on_stored: Stored | None = None) -> None:
        self.steps = steps
        self.on_stored = on_stored
        self.tally = Tally()
        self.shards_stored = 0
        self._writing: tuple[ShardRows, Pending[Counter]] | None = None  # shard N-1

    def run(self, shards: Iterable[list[ScanItem]]) -> Tally:
        decoding: PendingShard | None = None  # shard N+1
        try:
            for items in _then_none(shards):
                started = None
                if items is not None:
                    started = self.steps.start(items, self.steps.plan(items))
                if decoding is not None:
                    rows = self.steps.score(decoding)
                    self._stored()
                    with held():
                        self._writing = (rows, self.steps.persist(rows))
                decoding = started
            self._stored()
        except BaseException as exc:
            with held():
                if signal_of(exc) is not None:
                    note(signal_of(exc))
                self._settle(exc)
            raise
        finally:
            self.steps.close()
        return self.tally

    def _stored(self) -> None:
        """Wait for the write in flight to commit, then count it."""
        if self._writing is None:
            return
        rows, future = self._writing
        counts = future.result()
        with held():
            self._count(rows, counts)
        if self.on_stored is not None:
            self.on_stored(rows, counts, self.tally)

    def _count(self, rows: ShardRows, counts: Counter) -> None:
        self.tally.add(rows, counts)
        self.shards_stored += 1
        self._writing = None

    def _settle(self, exc: BaseException) -> None:
        """After a failure or an interruption: let the write in flight commit (or fail)
        before the caller records the run, and count it if it committed; its own error is
        noted on ``exc``."""
        if self._writing is None:
            return
        rows, future = self._writing
        try:
            counts = future.result()
        except BaseException as inner:
            self._writing = None
            exc.add_note(f"(the shard being written when this happened failed too: {inner})")
        else:
            self._count(rows, counts)


def _then_none(iterable: Iterable[T]) -> Iterator[T | None]:
    """The items, then one ``None`` so that the last pending shard is finished too."""
    yield from iterable
    yield None
