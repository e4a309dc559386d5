"""The device half of the pixel path: prepared items in, model-input batches and thumbnails out.

For each batch (:class:`DevicePixels`), in the process that owns the device:

1. **stage** (copy stream): each item's buffer goes to the device, ``non_blocking`` from pinned
   host memory: the shard's shared-memory arena (page-locked once, ``tasks.device.arena``) or,
   for an item that travelled inline, a pinned buffer from torch's caching host allocator
   (reused once its copy is done). Compressed frames are decoded there instead, batched across
   the images (``frame_decoder``, e.g. nvImageCodec), and left on the device.
2. **count** (stats stream, after the copy): Bits Stored corrected (frames), each pixel's index
   into the batch's table computed once, the whole batch's histograms counted in one vector
   (``index_add_`` on a GPU: ``bincount`` would wait for the device to size its output);
   the histograms (4 bytes per value Bits Stored allows: 16 KB for a 12-bit image) come back
   to the host.
3. **tables** (host): each image's display table from its histogram and header with the CPU
   path's own functions (``tasks.device.tables``): modality LUT, VOI LUT / window /
   percentiles and MONOCHROME1 inversion as ONE table; a blank or non-finite image fails here
   with the CPU path's reason.
4. **render** (compute stream): one lookup (``table[index]``) gives every pixel its summand (its
   16-bit display level, or its stored value when the table is a straight line), one running
   sum along the rows serves both output shapes, and the exact box sums divided once in
   float64 (``tasks.device.resize``) are the CPU path's ``box_means``: the model input,
   normalised per channel, and the review thumbnail, to the bit; thumbnails come back to
   pinned host memory.

Batch b+1 is staged and counted while batch b's tables are built and b is rendered and scored:
the copy and stats streams run ahead of the compute stream (double buffering, each batch's
buffers kept until the stream that reads them is done). On a CPU every stream is the host and
the same code runs in order.

**Mixed sizes.** Within a batch, images are grouped by (decoded shape, thumbnail shape): each
group is one stacked tensor and one sequence of kernels; a batch with k distinct shapes costs
k sequences. Nothing is padded (padding would need a fill of every pixel and waste the lookup,
the counting and the resize on mixed archives); an archive of a few detector formats makes a
few groups per batch.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from model.spec import PreprocessSpec
from tasks.device.prepare import DONE, FRAME, PIXELS, Prepared
from tasks.device.resize import box_counts, box_sums
from tasks.device.tables import display_levels
from tasks.dicom.decoders import PixelLayout
from tasks.dicom.outcomes import InputError
from tasks.dicom.pixels import DISPLAY_LEVELS
from tasks.dicom.values import safe_json

DEFAULT_BATCH_PIXELS_CUDA = 1 << 30
"""Pixels per device batch on a GPU at most (~290 images of 2000 x 1840). A batch holds about
20 bytes per pixel on the device at its peak (stored values, their copies, table indices,
summands, running sums) and the next batch, staged meanwhile, about 12: a quarter of the
device's memory bounds the two (:func:`_batch_pixels`)."""
DEFAULT_BATCH_PIXELS_CPU = 1 << 25


class FrameDecoder(Protocol):
    """Decodes compressed frames on the device (``tasks.dicom.decoders.nvimgcodec``)."""

    name: str
    syntaxes: frozenset[str]

    def decode_batch(
        self, frames: list[np.ndarray], layouts: list[PixelLayout], stream: Any
    ) -> list[torch.Tensor | str]:
        """One 2-D integer tensor on the device per frame, or why it was refused."""
        ...


@dataclass
class Rendered:
    """One batch out of the device, in the order its items came in."""

    positions: list[int]  # the items' positions (as given to ``DevicePixels.render``)
    images: torch.Tensor  # (n, C, S, S) float32 on the device, row i for positions[i]
    facts: list[dict[str, Any]]
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    refused: list[tuple[int, str]] = field(default_factory=list)  # frames for the CPU decoders
    _thumbs: list[Any] = field(default_factory=list)  # per row: host tensor/array, or None
    _ready: Any = None  # event after the thumbnails' copy

    def thumbnails(self) -> list[np.ndarray | None]:
        """The rows' thumbnails (uint8, host), once their copy has finished."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return [t.numpy() if isinstance(t, torch.Tensor) else t for t in self._thumbs]


class _Streams:
    """Copy, stats and compute streams on CUDA; nothing (in order) on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy = torch.cuda.Stream(device)
            self.stats = torch.cuda.Stream(device)
        else:
            self.copy = self.stats = None

    def on(self, stream: Any):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def event(self, stream: Any = None) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

    def wait(self, event: Any, stream: Any = None) -> None:
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)

    def keep(self, tensor: torch.Tensor, stream: Any = None) -> None:
        """``tensor`` is used on ``stream`` too: its memory is not reused before that is done."""
        if self.cuda:
            tensor.record_stream(stream if stream is not None else torch.cuda.current_stream())


@dataclass
class _Group:
    key: tuple
    rows: list[int]  # indices into the batch's item list
    values: torch.Tensor | None = None  # (G, H, W) stored values on the device
    index: torch.Tensor | None = None  # (G, H, W) int32 position in the batch's flat table


@dataclass
class _Batch:
    positions: list[int]
    items: list[Prepared]
    groups: list[_Group] = field(default_factory=list)
    first: list[int] = field(default_factory=list)  # stored value of each item's bin 0
    bins: list[int] = field(default_factory=list)
    base: list[int] = field(default_factory=list)  # each item's bin 0 in the flat histogram
    facts: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # row -> reason
    refused: dict[int, str] = field(default_factory=dict)
    done_images: dict[int, torch.Tensor] = field(default_factory=dict)
    histogram: torch.Tensor | None = None  # host (pinned on CUDA)
    raw_high: torch.Tensor | None = None  # per item: max before Bits Stored correction (frames)
    lines: dict[int, tuple[float, float, int]] = field(default_factory=dict)  # value, slope, low
    largest: dict[int, int] = field(default_factory=dict)  # magnitude of each item's summands
    counted: Any = None  # event: histograms on the host
    keep: list[Any] = field(default_factory=list)  # host buffers in flight


Buffer = Callable[[Prepared], np.ndarray]


class DevicePixels:
    """Renders prepared items into model inputs and thumbnails on ``device``, in batches.

    ``batch_size`` images at most per batch, and at most ``batch_pixels`` stored pixels.
    ``frame_decoder``: decodes FRAME items on the device (None: FRAME items are refused and
    reported for CPU decoding). ``profile``: wait for the device after each step and add the
    seconds to :attr:`timings` (for benchmarks; it removes the overlap).
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        device: torch.device,
        *,
        batch_size: int = 256,
        batch_pixels: int | None = None,
        frame_decoder: FrameDecoder | None = None,
        profile: bool = False,
    ) -> None:
        self.spec = spec
        self.device = device
        self.batch_size = max(1, batch_size)
        self.batch_pixels = batch_pixels or _batch_pixels(device)
        self.frame_decoder = frame_decoder
        self.profile = profile
        self.timings: Counter = Counter()
        self._streams = _Streams(device)
        self._index_add = True  # histograms by index_add_ on CUDA (see _count)
        self._mean = [float(np.float32(m)) for m in spec.mean]
        self._std = [float(np.float32(s)) for s in spec.std]

    # -- the loop ---------------------------------------------------------------------------

    def render(self, items: Iterable[tuple[int, Prepared]], buffer: Buffer) -> Iterator[Rendered]:
        """Rendered batches for ``(position, item)`` pairs (items without an error).

        ``buffer(item)``: the item's stored values or frame bytes as a host array (an arena
        view or the inline data). Batch b+1 is staged and counted before batch b is rendered.
        """
        ahead: _Batch | None = None
        for batch in self._batches(items):
            staged = self._stage_and_count(batch, buffer)
            if ahead is not None:
                yield self._render(ahead)
            ahead = staged
        if ahead is not None:
            yield self._render(ahead)

    def _batches(self, items: Iterable[tuple[int, Prepared]]) -> Iterator[_Batch]:
        positions: list[int] = []
        chosen: list[Prepared] = []
        pixels = 0
        for position, item in items:
            n = _pixels(item)
            if chosen and (len(chosen) >= self.batch_size or pixels + n > self.batch_pixels):
                yield _Batch(positions, chosen)
                positions, chosen, pixels = [], [], 0
            positions.append(position)
            chosen.append(item)
            pixels += n
        if chosen:
            yield _Batch(positions, chosen)

    # -- steps 1 and 2: stage and count ---------------------------------------------------------

    def _stage_and_count(self, batch: _Batch, buffer: Buffer) -> _Batch:
        started = time.perf_counter()
        s = self._streams
        n = len(batch.items)
        batch.facts = [dict(item.facts) for item in batch.items]
        batch.first, batch.bins = [0] * n, [0] * n
        on_device: dict[int, torch.Tensor] = {}
        frames = [i for i, item in enumerate(batch.items) if item.kind == FRAME]
        if frames:
            self._decode_frames(batch, frames, buffer, on_device)
        with s.on(s.copy):
            for i, item in enumerate(batch.items):
                if item.kind == PIXELS:
                    on_device[i] = self._to_device(buffer(item), batch)
                    batch.first[i], batch.bins[i] = _stored_range(item.layout)
                elif item.kind == DONE:
                    batch.done_images[i] = self._to_device(item.image, batch)
        copied = s.event(s.copy)
        self._time("stage", started, s.copy)

        started = time.perf_counter()
        batch.base = list(np.cumsum([0, *batch.bins[:-1]])) if n else []
        total = int(sum(batch.bins))
        with s.on(s.stats):
            s.wait(copied, s.stats)
            histogram = torch.zeros(max(total, 1), dtype=torch.int32, device=self.device)
            raw_high = torch.zeros(n, dtype=torch.int64, device=self.device)
            by_key: dict[tuple, list[int]] = defaultdict(list)
            for i, values in on_device.items():
                item = batch.items[i]
                layout = item.layout
                kind = (item.kind, layout.bits_stored, layout.signed) if layout else (item.kind,)
                by_key[(tuple(values.shape), values.dtype, item.thumb_shape, kind)].append(i)
            batch.keep.extend(on_device.values())  # until the stats stream has read them
            for key, rows in by_key.items():
                group = _Group(key, rows, _stack([on_device[i] for i in rows]))
                self._count(batch, group, histogram, raw_high)
                batch.groups.append(group)
            host = torch.empty(histogram.shape, dtype=torch.int32, pin_memory=s.cuda)
            host.copy_(histogram, non_blocking=True)
            high_host = torch.empty(n, dtype=torch.int64, pin_memory=s.cuda)
            high_host.copy_(raw_high, non_blocking=True)
            batch.histogram, batch.raw_high = host, high_host
            batch.counted = s.event(s.stats)
        self._time("count", started, s.stats)
        return batch

    def _to_device(self, array: np.ndarray | None, batch: _Batch) -> torch.Tensor:
        """A host array on the device, copied asynchronously from pinned memory."""
        host = _host_tensor(array)
        if self.device.type != "cuda":
            return host
        if not host.is_pinned():  # inline: through a pinned buffer the allocator reuses
            pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            pinned.copy_(host)
            host = pinned
        batch.keep.append(host)
        return host.to(self.device, non_blocking=True)

    def _decode_frames(
        self, batch: _Batch, rows: list[int], buffer: Buffer, on_device: dict[int, torch.Tensor]
    ) -> None:
        decoder = self.frame_decoder
        if decoder is None:
            for i in rows:
                batch.refused[i] = "no device decoder is available in this process"
            return
        items = [batch.items[i] for i in rows]
        try:
            with self._streams.on(self._streams.stats):
                results = decoder.decode_batch(
                    [buffer(item) for item in items],
                    [item.layout for item in items],  # type: ignore[misc]
                    self._streams.stats,
                )
        except Exception as exc:  # the whole call failed: every frame goes to the CPU
            results = [f"{type(exc).__name__}: {exc}"] * len(items)
        for i, item, result in zip(rows, items, results, strict=True):
            layout = item.layout
            assert layout is not None
            if isinstance(result, str):
                batch.refused[i] = result
                continue
            if result.dtype.is_floating_point or result.dtype.is_signed != layout.signed:
                batch.refused[i] = (
                    f"{decoder.name} decoded {result.dtype} values for "
                    f"Pixel Representation {int(layout.signed)}"
                )
                continue
            if tuple(result.shape) != (layout.rows, layout.columns):
                batch.refused[i] = (
                    f"{decoder.name} decoded {tuple(result.shape)} pixels, not the "
                    f"{layout.rows} x {layout.columns} of the header"
                )
                continue
            on_device[i] = result
            batch.first[i], batch.bins[i] = _stored_range(layout)
            batch.facts[i].update(
                decoder=decoder.name,
                reduce_level=0,
                draft_scale=1,
                decoded_shape=[layout.rows, layout.columns],
            )

    def _count(
        self, batch: _Batch, group: _Group, histogram: torch.Tensor, raw_high: torch.Tensor
    ) -> None:
        """The group's table indices and its images' histograms (into ``histogram``)."""
        rows = group.rows
        values = group.values
        assert values is not None
        v = values.to(torch.int32)
        if batch.items[rows[0]].kind == FRAME:
            layout = batch.items[rows[0]].layout
            assert layout is not None
            v = self._correct_bits(v, rows, layout, raw_high)
        offset = self._small([batch.base[i] - batch.first[i] for i in rows], torch.int32)
        index = v + offset.view(-1, 1, 1)
        flat = index.reshape(-1)
        if self._streams.cuda and self._index_add:
            # no host synchronisation: bincount would read the largest index to size its output
            try:
                ones = torch.ones(1, dtype=torch.int32, device=self.device).expand(flat.numel())
                histogram.index_add_(0, flat, ones)
                group.index = index
                group.values = None
                return
            except (RuntimeError, NotImplementedError):  # an older build: bincount, waiting
                self._index_add = False
        histogram += torch.bincount(flat, minlength=histogram.numel()).to(torch.int32)
        group.index = index
        group.values = None

    def _correct_bits(
        self, v: torch.Tensor, rows: list[int], layout: PixelLayout, raw_high: torch.Tensor
    ) -> torch.Tensor:
        """Bits above Bits Stored removed (unsigned) or sign-extended from it (signed), as
        ``tasks.dicom.decoders.correct_stored_bits``; the raw maximum is kept (the
        ``high_bits_masked`` fact)."""
        bits = layout.bits_stored
        where = self._small(rows, torch.int64)
        if layout.signed:
            low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            outside = ((v < low) | (v > high)).flatten(1).any(dim=1).to(torch.int64)
            raw_high.index_copy_(0, where, outside)
            shift = 32 - bits
            return torch.bitwise_right_shift(torch.bitwise_left_shift(v, shift), shift)
        raw_high.index_copy_(0, where, v.flatten(1).amax(dim=1).to(torch.int64))
        return torch.bitwise_and(v, (1 << bits) - 1)

    # -- steps 3 and 4: tables and render -------------------------------------------------------

    def _render(self, batch: _Batch) -> Rendered:
        s = self._streams
        started = time.perf_counter()
        if batch.counted is not None:
            batch.counted.synchronize()
        histogram = batch.histogram.numpy() if batch.histogram is not None else None
        table = np.zeros(max(int(sum(batch.bins)), 1), dtype=np.int32)
        for group in batch.groups:
            for i in group.rows:
                self._table(batch, i, batch.items[i], histogram, table)
        self._time("tables", started)

        started = time.perf_counter()
        size = self.spec.input_size
        outputs: dict[int, torch.Tensor] = {}
        thumbs: dict[int, Any] = {}
        s.wait(batch.counted)
        host_table = torch.from_numpy(table)
        if s.cuda:
            host_table = host_table.pin_memory()
            batch.keep.append(host_table)
        table_dev = host_table.to(self.device, non_blocking=True)
        for group in batch.groups:
            index = group.index
            assert index is not None
            s.keep(index)
            summands = table_dev[index]  # the one lookup at full resolution
            (height, width), thumb_shape = group.key[0], group.key[2]
            shapes = [(size, size)] + ([thumb_shape] if thumb_shape is not None else [])
            largest = max(batch.largest.get(i, 0) for i in group.rows)
            sums = box_sums(summands, shapes, largest)
            displayed = [
                self._displayed(
                    batch, group.rows, total / box_counts(height, width, shape, total.device)
                )
                for total, shape in zip(sums, shapes, strict=True)
            ]
            model = displayed[0].to(torch.float32)
            images = torch.empty(
                (len(group.rows), self.spec.channels, size, size),
                dtype=torch.float32,
                device=self.device,
            )
            for c in range(self.spec.channels):
                torch.sub(model, self._mean[c], out=images[:, c])
                images[:, c].div_(self._std[c])
            for g, i in enumerate(group.rows):
                outputs[i] = images[g]
            if thumb_shape is not None:  # pixels.to_uint8 of the float64 means
                u8 = torch.clamp(torch.round(displayed[1] * 255.0), 0, 255).to(torch.uint8)
                host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=s.cuda)
                host.copy_(u8, non_blocking=True)
                for g, i in enumerate(group.rows):
                    thumbs[i] = host[g]
            group.index = None
        for i, image in batch.done_images.items():
            outputs[i] = image
            thumbs[i] = batch.items[i].thumbnail
        rendered = self._assemble(batch, outputs, thumbs)
        rendered._ready = s.event()
        self._time("render", started, torch.cuda.current_stream() if s.cuda else None)
        return rendered

    def _table(
        self, batch: _Batch, i: int, item: Prepared, histogram: np.ndarray | None, table: np.ndarray
    ) -> None:
        assert histogram is not None and item.layout is not None
        base, first, bins = batch.base[i], batch.first[i], batch.bins[i]
        counts = histogram[base : base + bins]
        try:
            summands, low, facts, line = display_levels(
                item.header, item.layout, item.photometric, self.spec, counts, first
            )
        except InputError as exc:
            batch.failed[i] = _with_read_warnings(str(exc), item)
            return
        start = base + (low - first)
        table[start : start + len(summands)] = summands
        if line is not None:
            batch.lines[i] = (line[0], line[1], low)
            batch.largest[i] = max(abs(low), abs(low + len(summands) - 1))
        else:
            batch.largest[i] = DISPLAY_LEVELS
        out = batch.facts[i]
        if item.kind == FRAME:  # see _correct_bits: a flag (signed) or the raw maximum
            raw = int(batch.raw_high[i])  # type: ignore[index]
            limit = (1 << item.layout.bits_stored) - 1
            out["high_bits_masked"] = bool(raw) if item.layout.signed else raw > limit
        out.update(facts)
        out["pixel_path"] = "device"
        if item.thumb_shape is not None:
            out["thumbnail_shape"] = list(item.thumb_shape)
        out["input_size"] = self.spec.input_size

    def _displayed(self, batch: _Batch, rows: list[int], means: torch.Tensor) -> torch.Tensor:
        """[0, 1] float64 images from box means, as ``pixels.box_means`` makes them: levels / 65535,
        or, for an image whose table is a straight line, the line applied to the means of its
        stored values (``value + slope * (mean - low)``, clipped), with the same float64
        operations in the same order."""
        levels = means / float(DISPLAY_LEVELS)
        if not any(i in batch.lines for i in rows):
            return levels
        lines = [batch.lines.get(i, (0.0, 0.0, 0)) for i in rows]
        column = (len(rows), 1, 1)
        value, slope, low = (
            self._small([float(x[k]) for x in lines], torch.float64).view(column) for k in range(3)
        )
        is_line = self._small([i in batch.lines for i in rows], torch.bool).view(column)
        straight = torch.clamp(value + slope * (means - low), 0.0, 1.0)
        return torch.where(is_line, straight, levels)

    def _assemble(
        self, batch: _Batch, outputs: dict[int, torch.Tensor], thumbs: dict[int, Any]
    ) -> Rendered:
        rows = [i for i in range(len(batch.items)) if i in outputs and i not in batch.failed]
        size = self.spec.input_size
        if rows:
            images = torch.stack([outputs[i] for i in rows])
        else:
            images = torch.empty((0, self.spec.channels, size, size), device=self.device)
        facts = [
            batch.facts[i] if batch.items[i].kind == DONE else safe_json(batch.facts[i])
            for i in rows
        ]
        return Rendered(
            positions=[batch.positions[i] for i in rows],
            images=images,
            facts=facts,
            failed=[(batch.positions[i], why) for i, why in batch.failed.items()],
            refused=[(batch.positions[i], why) for i, why in batch.refused.items()],
            _thumbs=[thumbs.get(i) for i in rows],
        )

    def _small(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small tensor on the device without waiting for it: copied from pinned memory
        (a copy from pageable memory would wait for the stream's earlier work)."""
        host = torch.tensor(values, dtype=dtype)
        if not self._streams.cuda:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _time(self, step: str, started: float, stream: Any = None) -> None:
        if self.profile and self._streams.cuda:
            (stream or torch.cuda.current_stream()).synchronize()
        self.timings[step] += time.perf_counter() - started


def _host_tensor(array: np.ndarray | None) -> torch.Tensor:
    """A tensor viewing ``array``. A read-only array (a view of a file's bytes) is only ever
    read here, so torch's warning about non-writable arrays does not apply."""
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _batch_pixels(device: torch.device) -> int:
    """Default pixels per batch: :data:`DEFAULT_BATCH_PIXELS_CUDA`, less on a smaller GPU."""
    if device.type != "cuda":
        return DEFAULT_BATCH_PIXELS_CPU
    memory = torch.cuda.get_device_properties(device).total_memory
    return int(max(1 << 24, min(DEFAULT_BATCH_PIXELS_CUDA, memory // (4 * 32))))


def _stored_range(layout: PixelLayout | None) -> tuple[int, int]:
    """(first stored value, number of values) that Bits Stored and Pixel Representation allow:
    the bins of an image's histogram (at most 65536: the device path takes 8- and 16-bit
    stored values). Counting the whole range needs no minimum or maximum beforehand."""
    assert layout is not None
    bits = layout.bits_stored
    return (-(1 << (bits - 1)) if layout.signed else 0), 1 << bits


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One (G, H, W) tensor; int32 where torch has no kernel for the stored type."""
    try:
        return torch.stack(tensors)
    except (RuntimeError, NotImplementedError):  # e.g. uint16 on an older CUDA build
        return torch.stack([t.to(torch.int32) for t in tensors])


def _pixels(item: Prepared) -> int:
    if item.kind == FRAME and item.layout is not None:
        return item.layout.rows * item.layout.columns
    return int(np.prod(item.shape)) if item.shape else 1


def _with_read_warnings(reason: str, item: Prepared) -> str:
    if item.read_warnings:  # as tasks.dicom.pixels.preprocess words it
        return f"{reason} (while reading: {'; '.join(item.read_warnings)[:300]})"
    return reason
