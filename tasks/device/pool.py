"""The device path's decode pool: ``DecodePool``'s interface, the work split differently.

``tasks.screening.ShardProcessor`` talks to its pool through ``start(args)`` (one
``tasks.ingest.decode_item`` argument tuple per selected file; returns at once) and
``results(job)`` (one ``tasks.ingest.Decoded`` per file, in order). :class:`DevicePool` keeps
that contract, so the processor's classification, skip plan, fingerprints and rows are the
same code for both paths, and does the work as the device path does it:

* ``start``: the files' buffers get slots in this shard's shared-memory arena (sized from the
  header scan; two arenas alternate), and the decode workers run
  ``tasks.device.prepare.prepare_item`` with the very ``decode_item`` arguments;
* ``results``: as the workers' records arrive, ``DevicePixels`` renders them on the device in
  batches (the next batch's copy overlapped); each record gets its model input (copied back to
  pinned host memory, asynchronously) and its facts; review thumbnails are encoded and written
  by a few threads of this process (JPEG encoding releases the GIL); frames the device decoder
  refused are decoded by the workers on the CPU at the end of the shard (their facts say
  ``device_decode_refused``).

The model input then goes to the predictor as on the CPU path (a 150 x 150 x 3 float32 image is
270 KB: copying it back and forth costs ~1% of the bytes the raw pixels moved).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tasks.decode_pool import DecodeJob, DecodePool
from tasks.device import arena as arenas
from tasks.device.pipeline import DevicePixels, Rendered
from tasks.device.prepare import Options, Prepared, prepare_item, prepare_many
from tasks.dicom.headers import InstanceHeader
from tasks.dicom.thumbnails import write_thumbnail
from tasks.ingest import Decoded as Record

log = logging.getLogger(__name__)


def default_arena_bytes() -> int:
    """A quarter of physical memory, at most 16 GiB, per arena (two are in use)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return int(min(16 << 30, physical // 4))


def buffer_bytes(header: InstanceHeader | None) -> int | None:
    """The stored values' size from the header (also an upper bound for a lossless frame)."""
    if header is None or not header.rows or not header.columns:
        return None
    per_sample = max(1, -(-(header.bits_allocated or 16) // 8))
    return int(header.rows) * int(header.columns) * per_sample


def slot_bytes(call: tuple, header: InstanceHeader | None) -> int | None:
    """An arena slot's size for one file: from its header, or for a file its worker scans
    (no header yet), its size on disk (an upper bound for native pixel data and for the
    frames handed over compressed; a frame the worker decodes that is larger travels inline)."""
    if header is not None or call[1] is not None:
        return buffer_bytes(header)
    return call[0].size


@dataclass
class DeviceJob:
    """A shard's files being prepared by the workers, and the arena their buffers go to."""

    calls: list[tuple]  # decode_item's arguments, one tuple per file
    inner: DecodeJob
    arena: arenas.Arena | None = None


@dataclass
class _Out:
    record: Record
    thumbnail: Future | None = None


@dataclass
class _Landing:
    """A rendered batch whose model inputs are on their way to the host."""

    rendered: Rendered
    images: torch.Tensor
    event: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class DevicePool:
    """``DecodePool``'s interface for the device path (see the module text).

    ``headers``: the selected files' headers by URI, set by the caller before ``start`` (for
    the arena slots; a file without one travels inline). ``options``: for the workers; the
    same without device syntaxes is used for the CPU retry of refused frames.
    """

    def __init__(
        self,
        workers: int,
        pixels: DevicePixels,
        options: Options,
        *,
        handover: str = "auto",
        arena_bytes: int | None = None,
        thumbnail_threads: int = 4,
    ) -> None:
        if handover not in ("auto", "shm", "inline"):
            raise ValueError(f"handover should be auto, shm or inline, not {handover!r}")
        self.workers = workers
        self.inner = DecodePool(workers, decode=prepare_item, decode_chunk=prepare_many)
        self.pixels = pixels
        self.options = options
        self.cpu_options = Options(frozenset(), options.max_pixels, options.reduce_margin)
        self.handover = ("shm" if workers > 0 else "inline") if handover == "auto" else handover
        self.arena_bytes = arena_bytes or default_arena_bytes()
        self.headers: dict[str, InstanceHeader] = {}
        self.timings: Counter = Counter()
        self._free: list[arenas.Arena] = []  # arenas no job is using (at most two kept)
        self._arenas: list[arenas.Arena] = []  # all of them, closed with the pool
        self._writer = ThreadPoolExecutor(max(1, thumbnail_threads), thread_name_prefix="thumbs")

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.inner.close()
        self._writer.shutdown(wait=True)
        for arena in self._arenas:
            arena.close()
        self._arenas, self._free = [], []

    # -- start --------------------------------------------------------------------------------

    def start(self, calls: list[tuple]) -> DeviceJob:
        """Start preparing the files of ``calls`` (``decode_item`` argument tuples)."""
        calls = list(calls)
        sizes = [slot_bytes(call, self.headers.get(call[0].uri)) for call in calls]
        arena, slots = self._arena_for(sizes)
        name = arena.name if arena is not None else None
        jobs = [
            (call[0], call, self.options, name, slot)
            for call, slot in zip(calls, slots, strict=True)
        ]
        return DeviceJob(calls, self.inner.start(jobs), arena)

    def _arena_for(self, sizes: list[int | None]) -> tuple[arenas.Arena | None, list[Any]]:
        """A free arena large enough for ``sizes`` (the shard loop has two jobs in flight, so
        two arenas alternate), and the slots in it."""
        if self.handover != "shm" or not any(sizes):
            return None, [None] * len(sizes)
        need = min(sum(arenas.aligned(n) for n in sizes if n), self.arena_bytes)
        fitting = [a for a in self._free if a.size >= need]
        if fitting:
            arena = fitting[0]
            self._free.remove(arena)
        else:
            if len(self._free) >= 2:  # replaced by a larger one
                old = self._free.pop(0)
                self._arenas.remove(old)
                old.close()
            try:  # headroom, so that a slightly larger shard does not recreate it
                arena = arenas.Arena(
                    min(max(need + need // 8, 64 << 20), self.arena_bytes),
                    pin=self.pixels.device.type == "cuda",
                )
            except OSError as exc:  # /dev/shm too small, say: buffers travel inline
                log.warning("no shared-memory arena (%s); pixel buffers go through the pool", exc)
                self.handover = "inline"
                return None, [None] * len(sizes)
            self._arenas.append(arena)
        return arena, arenas.plan(sizes, arena.size)

    def _release(self, job: DeviceJob) -> None:
        """The job's arena is free again (its buffers were all read by the device)."""
        if job.arena is not None:
            self._free.append(job.arena)
            job.arena = None

    # -- results ------------------------------------------------------------------------------

    def results(self, job: DeviceJob) -> Iterator[Record]:
        """One record per file of the job, in order, each with its model input (host)."""
        n = len(job.calls)
        outs: list[_Out | None] = [None] * n
        prepared: list[Prepared | None] = [None] * n

        def arriving() -> Iterator[tuple[int, Prepared]]:
            results = self.inner.results(job.inner)
            for position in range(n):
                waited = time.perf_counter()
                result = next(results)
                self.timings["wait_workers"] += time.perf_counter() - waited
                if isinstance(result, Prepared):
                    prepared[position] = result
                    outs[position] = _Out(result.record)
                    if not result.settled:
                        yield position, result
                else:  # a record from the pool itself (a file that crashed its worker)
                    outs[position] = _Out(result)

        try:
            refused = self._render_all(arriving(), _Buffers(job.arena), prepared, outs)
        finally:  # every copy from the arena has landed (or the job is abandoned)
            self._synchronize()
            self._release(job)
        if refused:
            self._retry_on_cpu(job, refused, prepared, outs)
        started = time.perf_counter()
        for out in outs:
            assert out is not None
            if out.thumbnail is not None:
                try:
                    out.record.thumbnail_path = str(out.thumbnail.result())
                except OSError as exc:
                    out.record.facts["thumbnail_error"] = (
                        f"could not write the thumbnail: {exc.strerror or exc}"
                    )
        self.timings["wait_thumbnails"] += time.perf_counter() - started
        for out in outs:
            assert out is not None
            yield out.record

    def _synchronize(self) -> None:
        if self.pixels.device.type == "cuda":
            torch.cuda.synchronize(self.pixels.device)

    def decode_all(self, calls: list[tuple]) -> list[Record]:
        return list(self.results(self.start(calls)))

    def _render_all(
        self,
        items: Iterator[tuple[int, Prepared]],
        buffer: _Buffers,
        prepared: list[Prepared | None],
        outs: list[_Out | None],
    ) -> list[tuple[int, str]]:
        refused: list[tuple[int, str]] = []
        landing: list[_Landing] = []
        for rendered in self.pixels.render(items, buffer):
            refused.extend(rendered.refused)
            for position, reason in rendered.failed:
                outs[position].record.error = reason  # type: ignore[union-attr]
            landing.append(self._send_home(rendered))
            if len(landing) > 1:  # the batch before has (nearly) landed
                self._land(landing.pop(0), prepared, outs)
        for entry in landing:
            self._land(entry, prepared, outs)
        return refused

    def _send_home(self, rendered: Rendered) -> _Landing:
        """Start copying a batch's model inputs to (pinned) host memory."""
        images = rendered.images
        if images.device.type != "cuda":
            return _Landing(rendered, images)
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        host.copy_(images, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Landing(rendered, host, event)

    def _land(
        self, landing: _Landing, prepared: list[Prepared | None], outs: list[_Out | None]
    ) -> None:
        started = time.perf_counter()
        if landing.event is not None:
            landing.event.synchronize()
        rendered = landing.rendered
        images = landing.images.numpy()
        thumbs = rendered.thumbnails()
        self.timings["wait_device"] += time.perf_counter() - started
        for k, position in enumerate(rendered.positions):
            out = outs[position]
            item = prepared[position]
            assert out is not None and item is not None
            out.record.image = images[k]
            out.record.facts = rendered.facts[k]
            thumb = thumbs[k]
            if thumb is not None and item.thumbnail_path is not None:
                # ``thumb`` views a pinned buffer that stays allocated while the view lives
                size = max(item.thumb_shape or thumb.shape)
                out.thumbnail = self._writer.submit(
                    write_thumbnail, thumb, item.thumbnail_path, size=size
                )

    def _retry_on_cpu(
        self,
        job: DeviceJob,
        refused: list[tuple[int, str]],
        prepared: list[Prepared | None],
        outs: list[_Out | None],
    ) -> None:
        """Decode the frames the device refused on the CPU (inline), then render them."""
        jobs = [(job.calls[p][0], job.calls[p], self.cpu_options, None, None) for p, _ in refused]
        again = self.inner.decode_all(jobs)
        retry: list[tuple[int, Prepared]] = []
        for (position, why), result in zip(refused, again, strict=True):
            if not isinstance(result, Prepared):
                outs[position] = _Out(result)
                continue
            result.record.facts["device_decode_refused"] = why
            prepared[position] = result
            outs[position] = _Out(result.record)
            if not result.settled:
                retry.append((position, result))
        still = self._render_all(iter(retry), _Buffers(None), prepared, outs)
        for position, why in still:  # cannot happen: nothing went to the device decoder
            outs[position].record.error = why  # type: ignore[union-attr]


class _Buffers:
    """An item's host buffer: its arena slot, or the array it carried."""

    def __init__(self, arena: arenas.Arena | None) -> None:
        self.arena = arena

    def __call__(self, item: Prepared) -> np.ndarray:
        if item.slot is not None and self.arena is not None:
            offset, _ = item.slot
            return self.arena.view(offset, item.shape, item.dtype)
        if item.data is None:
            raise ValueError(f"a {item.kind} item has neither a slot nor inline data")
        return item.data
