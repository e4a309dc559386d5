"""JPEG 2000 and JPEG decoded on an NVIDIA GPU with nvImageCodec (``nvidia-nvimgcodec-cu13``).

Two ways in, one library:

* :class:`NvImageCodecFrames` (what the device pixel path uses, ``tasks.device``): a batch of
  frames, one from each of many files, decoded in ONE call (nvImageCodec batches them across
  its CUDA decoders, nvJPEG2000 / nvJPEG), on the caller's CUDA stream, with
  ``allow_any_depth`` so that 12-16-bit samples keep their values; the results stay on the
  device as torch tensors. A frame it cannot decode comes back as the reason, and the caller
  decodes that file on the CPU instead (its facts say so).
* :class:`NvImageCodec`, a ``Backend`` of the decoder registry (``decode`` of one frame, copied
  back to the host): last, after the CPU decoders the registry prefers (it is in no
  ``PREFERENCE`` list), i.e. only when they all fail, and only in a process that owns the GPU
  (:func:`enable_in_this_process`; the device path calls it). Decode workers never touch the
  GPU: sixteen processes each with a CUDA context (and torch imported to find the device) would
  cost seconds and gigabytes for a last resort. Per-frame decoding with a copy back is what the
  device path exists to avoid.

``unavailable`` says why it cannot run here: not the GPU's process, the package is not
installed or does not import, or there is no CUDA device. The probes are made once per
process.

Reduced resolution: nvImageCodec's Python API (0.8) has no resolution-level (``reduce``)
option for JPEG 2000: ``DecodeParams`` holds only ``apply_exif_orientation``, ``color_spec``
and ``allow_any_depth``; a region of interest (``CodeStream.get_sub_code_stream(region=...)``)
crops, it does not downscale. So frames decode at full resolution on the GPU, and the device
resizes them (exactly as the CPU path resizes a full-resolution image).

Written from nvImageCodec's documented Python API (``Decoder``, ``DecodeParams``,
``CodeStream``, ``Decoder.decode(list, params=, cuda_stream=)`` returning ``None`` at the
positions that failed, ``Image.__dlpack__``); it has not run in this repository's CI, which has
no GPU: ``benchmarks/bench_gpu_e2e.py`` exercises it on a GPU machine.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from tasks.dicom.decoders.base import Backend, Decoded, DecodeJob, PixelLayout, as_2d

NAME = "nvimgcodec"
PACKAGE = "nvidia-nvimgcodec-cu13"

SYNTAXES = frozenset(
    {
        JPEG2000Lossless,
        JPEG2000,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
    }
)
"""JPEG 2000 (and HTJ2K) through nvJPEG2000, baseline and extended JPEG through nvJPEG."""


_ENABLED = False


def enable_in_this_process() -> None:
    """Let the registry backend decode here (the process that owns the GPU)."""
    global _ENABLED
    _ENABLED = True


@functools.cache
def _library() -> tuple[Any, str | None]:
    """(the nvimgcodec module, None) or (None, why it cannot be used)."""
    try:
        from nvidia import nvimgcodec  # type: ignore[import-not-found]
    except ImportError as exc:
        return None, f"{PACKAGE} is not installed ({exc})"
    except Exception as exc:  # a broken install (missing CUDA libraries, say)
        return None, f"{PACKAGE} does not import: {type(exc).__name__}: {exc}"
    return nvimgcodec, None


@functools.cache
def _gpu() -> str | None:
    """None when a CUDA device is usable here; else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def unavailable_reason() -> str | None:
    """Why nvImageCodec cannot decode here, or None."""
    _, why = _library()
    return why or _gpu()


def _params(nvimgcodec: Any) -> Any:
    """Samples as stored: no colour conversion, native bit depth, no EXIF rotation."""
    return nvimgcodec.DecodeParams(
        apply_exif_orientation=False,
        color_spec=nvimgcodec.ColorSpec.UNCHANGED,
        allow_any_depth=True,
    )


def _code_stream(nvimgcodec: Any, frame: np.ndarray | bytes) -> Any:
    array = np.frombuffer(frame, dtype=np.uint8) if isinstance(frame, bytes) else frame
    return nvimgcodec.CodeStream(np.ascontiguousarray(array, dtype=np.uint8))


def _refusal(stream: Any, layout: PixelLayout) -> str | None:
    """Why a code stream is not for this path (checked before decoding; attributes that an
    older nvImageCodec lacks are not checked)."""
    channels = getattr(stream, "num_channels", 1)
    if channels not in (None, 1):
        return f"{NAME}: the code stream has {channels} components, not 1"
    height, width = getattr(stream, "height", None), getattr(stream, "width", None)
    if (
        height is not None
        and width is not None
        and (height, width)
        != (
            layout.rows,
            layout.columns,
        )
    ):
        return f"{NAME}: the code stream is {height} x {width}, the header {layout.rows} x " + str(
            layout.columns
        )
    precision = getattr(stream, "precision", 0) or 0
    if precision > 16:
        return f"{NAME}: {precision}-bit samples are not supported (16 at most)"
    return None


def _as_tensor(image: Any, torch: Any) -> Any:
    """A decoded nvImageCodec image as a 2-D torch tensor on its device (no copy)."""
    try:
        tensor = torch.from_dlpack(image)
    except (TypeError, AttributeError, RuntimeError):
        tensor = torch.as_tensor(image, device="cuda")
    if tensor.dim() == 3 and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
    elif tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    return tensor


class NvImageCodecFrames:
    """Batched decoding of compressed frames into device tensors (``FrameDecoder``)."""

    name = NAME
    syntaxes = SYNTAXES

    def __init__(self, device_index: int = 0) -> None:
        nvimgcodec, why = _library()
        if nvimgcodec is None:
            raise RuntimeError(why)
        self._nv = nvimgcodec
        self._decoder = nvimgcodec.Decoder(device_id=device_index)
        self._params = _params(nvimgcodec)

    def decode_batch(
        self, frames: list[np.ndarray], layouts: list[PixelLayout], stream: Any
    ) -> list[Any]:
        """One 2-D integer tensor on the device per frame, or the reason it was refused."""
        import torch

        results: list[Any] = [None] * len(frames)
        streams, where = [], []
        for i, (frame, layout) in enumerate(zip(frames, layouts, strict=True)):
            try:
                code_stream = _code_stream(self._nv, frame)
            except Exception as exc:
                results[i] = f"{NAME}: the code stream cannot be parsed: {exc}"
                continue
            if (why := _refusal(code_stream, layout)) is not None:
                results[i] = why
                continue
            streams.append(code_stream)
            where.append(i)
        if streams:
            handle = stream.cuda_stream if stream is not None else 0
            images = self._decoder.decode(streams, params=self._params, cuda_stream=handle)
            for i, image in zip(where, images, strict=True):
                if image is None:
                    results[i] = f"{NAME} could not decode the frame"
                    continue
                tensor = _as_tensor(image, torch)
                if tensor.dim() != 2:
                    results[i] = f"{NAME} decoded an array of shape {tuple(tensor.shape)}"
                    continue
                results[i] = tensor
        return results


def device_frame_decoder(device: Any) -> tuple[NvImageCodecFrames | None, str | None]:
    """The batched decoder for ``device`` (a CUDA torch device), or None and why not."""
    if (why := unavailable_reason()) is not None:
        return None, why
    try:
        decoder = NvImageCodecFrames(device.index or 0)
        enable_in_this_process()
        return decoder, None
    except Exception as exc:  # the library is there but its decoder does not start
        return None, f"{NAME} decoder could not be created: {type(exc).__name__}: {exc}"


class NvImageCodec(Backend):
    """The registry's per-frame backend (full resolution, copied back to the host)."""

    name = NAME
    syntaxes = SYNTAXES

    def unavailable(self, tsyntax: UID) -> str | None:
        if not _ENABLED:  # cheap: decode workers get here for every JPEG 2000 / JPEG file
            return f"{NAME}: GPU decoding runs only in the process that owns the GPU"
        why = unavailable_reason()
        return f"{NAME}: {why}" if why else None

    def decode(self, job: DecodeJob) -> Decoded:
        nvimgcodec, why = _library()
        if nvimgcodec is None:
            raise RuntimeError(why)
        code_stream = _code_stream(nvimgcodec, job.frame())
        if (reason := _refusal(code_stream, job.layout)) is not None:
            raise RuntimeError(reason)
        image = _decoder(nvimgcodec).decode(code_stream, params=_params(nvimgcodec))
        if image is None:
            raise RuntimeError(f"{NAME} could not decode the frame")
        array = np.asarray(image.cpu())
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return Decoded(as_2d(np.ascontiguousarray(array)), NAME)


@functools.cache
def _decoder(nvimgcodec: Any) -> Any:
    return nvimgcodec.Decoder()
