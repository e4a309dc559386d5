"""Screening shards through the device pixel path, and the choice of path.

:class:`DeviceShardProcessor` is ``tasks.screening.ShardProcessor`` with another decode pool
(``tasks.device.pool.DevicePool``): the classification of a shard's files, the skip plan, the
fingerprints and every row are the ``ShardProcessor``'s own code, so the shard loop, the flows
and the fan-out run it unchanged and both paths store the same rows. What differs is who does
the pixel work: the workers only read, parse and hand over the buffers, and this process
windows, resizes and (with nvImageCodec) decodes them on the device, batch after batch.

The model inputs are the CPU path's to the bit (tests/tasks/test_device_pixels.py), so a run
may switch paths without changing a stored score. Facts add ``pixel_path`` (``device``, or
``cpu`` for what the device path leaves to the CPU path: 32-bit stored values).

Which path a run takes: :func:`resolve_pixel_path` (``auto``: the device path when the model
runs on CUDA, the CPU path otherwise; ``device`` or ``cpu`` to force one, e.g. to run the
device path's code on a CPU) and :func:`shard_processor`, which builds the right processor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import Checkpoint
from model.predictor import resolve_device
from tasks.device.pipeline import DevicePixels, FrameDecoder
from tasks.device.pool import DevicePool
from tasks.device.prepare import Options
from tasks.ingest import ScanItem
from tasks.screening import PendingShard, ShardProcessor, limit_inference_threads

log = logging.getLogger(__name__)

PIXEL_PATHS = ("auto", "device", "cpu")


def resolve_pixel_path(requested: str, device_type: str) -> str:
    """``device`` or ``cpu``: ``auto`` picks the device path when the model runs on CUDA."""
    if requested not in PIXEL_PATHS:
        raise ValueError(f"pixel path should be one of {', '.join(PIXEL_PATHS)}, not {requested!r}")
    if requested == "auto":
        return "device" if device_type == "cuda" else "cpu"
    return requested


def shard_processor(
    checkpoint: Checkpoint, *, pixel_path: str = "auto", device: str = "auto", **kwargs: Any
) -> ShardProcessor:
    """The shard processor for ``pixel_path`` (see :func:`resolve_pixel_path`); ``kwargs`` as
    ``ShardProcessor`` takes them."""
    path = resolve_pixel_path(pixel_path, resolve_device(device).type)
    cls = DeviceShardProcessor if path == "device" else ShardProcessor
    return cls(checkpoint, device=device, **kwargs)


class DeviceShardProcessor(ShardProcessor):
    """``ShardProcessor`` on the device pixel path (see the module text).

    ``frame_decoder``: ``"auto"`` (nvImageCodec when it and a GPU are there), None (every
    frame decoded by the workers), or an object with ``decode_batch`` (tests).
    ``handover``: ``"shm"`` (shared-memory arenas), ``"inline"`` (pickled through the pool),
    ``"auto"`` (arenas when there are workers). ``profile``: the device waits after each step
    and ``timings`` holds seconds per step (benchmarks; it removes the overlap).
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
        frame_decoder: FrameDecoder | str | None = "auto",
        handover: str = "auto",
        arena_bytes: int | None = None,
        batch_pixels: int | None = None,
        profile: bool = False,
    ) -> None:
        super().__init__(
            checkpoint,
            device=device,
            workers=workers,
            batch_size=batch_size,
            reduced=reduced,
            thumbnails_dir=thumbnails_dir,
        )
        self.handover = handover
        self.arena_bytes = arena_bytes
        self.frame_decoder, self.frame_decoder_missing = _frame_decoder(
            frame_decoder, self.predictor.device
        )
        self.pixels = DevicePixels(
            checkpoint.preprocessing,
            self.predictor.device,
            batch_size=self.predictor.batch_size,
            batch_pixels=batch_pixels,
            frame_decoder=self.frame_decoder,
            profile=profile,
        )
        syntaxes = self.frame_decoder.syntaxes if self.frame_decoder is not None else ()
        self.options = Options(frozenset(str(s) for s in syntaxes))

    def __enter__(self) -> DeviceShardProcessor:
        self._pool = DevicePool(  # type: ignore[assignment]  # DecodePool's interface
            self.workers,
            self.pixels,
            self.options,
            handover=self.handover,
            arena_bytes=self.arena_bytes,
        )
        if self.workers > 0:
            self._threads_before = limit_inference_threads(self.predictor, self.workers)
        return self

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per step so far: the pool's waits and the device steps."""
        out: dict[str, float] = dict(self.pixels.timings)
        if isinstance(self._pool, DevicePool):
            out.update(self._pool.timings)
        return out

    def submit(self, items: list[ScanItem], *args: Any, **kwargs: Any) -> PendingShard:
        """``ShardProcessor.submit``, after telling the pool the headers of the files scanned
        already (for the sizes of their arena slots; ``tasks.device.pool.slot_bytes``)."""
        pool = self.pool
        if isinstance(pool, DevicePool):
            pool.headers = {it.uri: it.header for it in items if it.header is not None}
        return super().submit(items, *args, **kwargs)


def _frame_decoder(
    choice: FrameDecoder | str | None, device: torch.device
) -> tuple[FrameDecoder | None, str | None]:
    """The device frame decoder to use, or None and why not."""
    if choice is None:
        return None, "no device frame decoder was asked for"
    if not isinstance(choice, str):
        return choice, None
    if choice != "auto":
        raise ValueError(f"frame_decoder should be 'auto', None or a decoder, not {choice!r}")
    if device.type != "cuda":
        return None, "the model does not run on a CUDA device"
    from tasks.dicom.decoders.nvimgcodec import device_frame_decoder

    decoder, why = device_frame_decoder(device)
    if decoder is None:
        log.info("JPEG 2000 and JPEG frames are decoded on the CPU: %s", why)
    return decoder, why
