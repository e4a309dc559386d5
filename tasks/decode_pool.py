"""The decode workers: one crash-isolating process pool for screening and training alike.

Decoding runs ``tasks.ingest.decode_item`` in spawn-context worker processes (a codec's C
library may hold global state, and fork would copy torch's threads). Work goes to the pool in
chunks of files (one pool task per chunk, not per image) and comes back in the order given.

A decoder that crashes its process (a codec fault, the kernel's out-of-memory killer) breaks
the whole pool. The pool is then restarted and the files whose results were lost are decoded
again one at a time, so that the crash is pinned on the file that caused it: a file that kills
its worker twice is *failed* with that reason, and every other file still decodes.

``workers=0`` decodes in the calling process (small jobs, tests, debugging).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from tasks.ingest import Decoded, decode_item, decode_many, init_worker

CRASH_REASON = (
    "decoding crashed the worker process twice (a codec fault or the memory limit); "
    "the file was not decoded"
)


@dataclass
class DecodeJob:
    """Files whose decoding is under way (``DecodePool.start``); ``args`` are
    ``decode_item``'s arguments, one tuple per file, in order."""

    args: list[tuple]
    chunks: list[tuple[int, Future]]  # (index of the chunk's first file, its pool task)
    pool: ProcessPoolExecutor | None = None  # the processes the chunks were given to


class DecodePool:
    """Spawn-context decode processes (``workers``; 0: decode in this process).

    Use as a context manager (the processes end on exit), or call ``close``. ``decode`` (the
    per-file function, module-level so that the workers can import it) and ``decode_chunk``
    (the same over a list of argument tuples) default to ``decode_item`` and ``decode_many``;
    tests pass stand-ins.
    """

    def __init__(
        self,
        workers: int,
        *,
        max_chunk: int | None = None,
        decode: Callable[..., Decoded] = decode_item,
        decode_chunk: Callable[[list[tuple]], list[Decoded]] = decode_many,
    ) -> None:
        if workers < 0:
            raise ValueError(f"a decode pool of {workers} workers is invalid, it must be >= 0")
        self.workers = workers
        self.max_chunk = max_chunk
        self._decode = decode
        self._decode_chunk = decode_chunk
        self._pool: ProcessPoolExecutor | None = self._new_pool() if workers > 0 else None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_deaf_worker,
        )

    def _restart(self) -> ProcessPoolExecutor:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        return self._pool

    def chunk_size(self, n: int) -> int:
        """A few chunks per worker: little IPC overhead, and the load still balances."""
        size = max(1, -(-n // (max(self.workers, 1) * 4)))
        return min(size, self.max_chunk) if self.max_chunk else size

    def start(self, args: list[tuple]) -> DecodeJob:
        """Start decoding ``args`` in the pool; returns at once (in-process: decodes nothing
        yet, ``results`` does)."""
        if self._pool is None or not args:
            return DecodeJob(list(args), [])
        size = self.chunk_size(len(args))
        with _born_deaf():
            chunks = [
                (i, self._pool.submit(self._decode_chunk, args[i : i + size]))
                for i in range(0, len(args), size)
            ]
        return DecodeJob(list(args), chunks, self._pool)

    def results(self, job: DecodeJob) -> Iterator[Decoded]:
        """The decoded files in the order of ``job.args``, as their chunks finish."""
        if not job.chunks:
            for a in job.args:
                yield self._decode(*a)
            return
        ends = [first for first, _ in job.chunks[1:]] + [len(job.args)]
        for (first, future), end in zip(job.chunks, ends, strict=True):
            try:
                yield from future.result()
            except BrokenProcessPool:
                # A decoder crashed its process: the chunks that had not finished are lost
                # (those that had keep their results). Find the culprit one file at a time.
                if self._pool is job.pool:  # not restarted since (by another job) yet
                    self._restart()
                for a in job.args[first:end]:
                    yield self._decode_alone(a)

    def decode_all(self, args: list[tuple]) -> list[Decoded]:
        return list(self.results(self.start(args)))

    def _decode_alone(self, a: tuple) -> Decoded:
        """Decode one file by itself; a file that kills its worker twice is failed."""
        for _ in range(2):
            if self._pool is None:
                raise RuntimeError("the decode pool was closed while its files were decoding")
            try:
                with _born_deaf():
                    future = self._pool.submit(self._decode, *a)
                return future.result()
            except BrokenProcessPool:
                self._restart()
        return Decoded(a[0].uri, error=CRASH_REASON)


# --- workers deaf to the signals that stop a run -------------------------------------------

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _born_deaf():
    """Block SIGINT and SIGTERM in this thread while it may start worker processes (the pool
    starts them on submit): they inherit the mask, so a Ctrl-C while they boot stays pending
    until ``_init_deaf_worker`` ignores it. (The run's own handler still runs: Python handles
    signals in the main thread whichever thread the kernel hands them to.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _init_deaf_worker() -> None:
    """A decode worker ignores SIGINT and SIGTERM: a terminal's Ctrl-C or a stop signal sent to
    the whole process group is meant for the run, which stops its pool in order. (Left to
    them, each worker would print a traceback, or die and look like a crashed decoder.)"""
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    init_worker()


# --- how many workers ------------------------------------------------------------------------


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
    """Decode processes for screening: with a GPU one per core; on the CPU, the cores
    ``inference_cores`` does not keep, plus one (the run's process sleeps while it waits for a
    shard).

    Measured on 2 cores (LGMobileNetV2 on the CPU, one inference thread; 240 images of
    2000 px, no thumbnails): 30 images/s with one worker, 37 with two, 35 with three.
    Training decodes its data set before it trains, so it uses every core
    (``available_cores``).
    """
    cores = available_cores()
    if device_type != "cpu":
        return cores
    return max(1, cores - inference_cores(cores) + 1)
