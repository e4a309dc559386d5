"""The decoder registry: which backends exist (one place to register) and in which order they
are tried for a transfer syntax (one place that picks), and ``decode``, which runs them.

Order for one frame:

1. When the caller allows a smaller image (``min_shape``) and the syntax is encapsulated, the
   available reduced-resolution backends for the syntax, in ``PREFERENCE`` order. The first
   that returns wins; a decline or failure is recorded as ``reduced_fallback`` and decoding
   continues at full resolution.
2. The available full-resolution backends for the syntax: first those ``PREFERENCE`` names,
   in that order (fastest first, as measured here: DESIGN.md, benchmarks/bench_decode.py),
   then any other available one by name (pydicom's own order for its plugins). Failures are
   recorded as ``decoders_failed``; when every one fails, their messages are combined into
   the file's reason.

Adding a backend (e.g. a GPU one): write a :class:`~tasks.dicom.decoders.base.Backend` (its
own module here), add an instance to ``_BACKENDS`` and its name to ``PREFERENCE`` for the
syntaxes it should lead on. Where it is unavailable (no library, no device) it is skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tasks.dicom.decoders.base import (
    Backend,
    Decline,
    Decoded,
    DecodeJob,
    PixelLayout,
    correct_stored_bits,
    one_line,
)
from tasks.dicom.decoders.nvimgcodec import NvImageCodec
from tasks.dicom.decoders.pydicom_plugins import Native, PydicomPlugin
from tasks.dicom.decoders.reduced import PillowJ2KReduce, PillowJpegDraft
from tasks.dicom.outcomes import InputError
from tasks.dicom.tags import label

PREFERENCE: dict[str, tuple[str, ...]] = {
    RLELossless: ("pylibjpeg", "pydicom", "gdcm"),
    JPEGBaseline8Bit: ("pillow-jpeg-draft", "pillow", "pylibjpeg", "gdcm"),
    JPEGExtended12Bit: ("pylibjpeg", "gdcm", "pillow"),
    JPEGLossless: ("gdcm", "pylibjpeg"),
    JPEGLosslessSV1: ("gdcm", "pylibjpeg"),
    JPEGLSLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
    JPEGLSNearLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
    JPEG2000Lossless: ("pillow-j2k-reduce", "pylibjpeg", "gdcm", "pillow"),
    JPEG2000: ("pillow-j2k-reduce", "pylibjpeg", "gdcm", "pillow"),
    HTJ2KLossless: ("pillow-j2k-reduce", "pylibjpeg"),
    HTJ2KLosslessRPCL: ("pillow-j2k-reduce", "pylibjpeg"),
    HTJ2K: ("pillow-j2k-reduce", "pylibjpeg"),
}
"""Backend names per transfer syntax, tried in this order (reduced routes and full-resolution
backends are ordered separately: see the module text)."""


class Registry:
    """Backends by name and the order they are tried in per transfer syntax."""

    def __init__(self, backends: Iterable[Backend], preference: dict[str, tuple[str, ...]]) -> None:
        self._backends: dict[str, Backend] = {}
        self.preference = preference
        for backend in backends:
            self.register(backend)

    def register(self, backend: Backend) -> None:
        if not backend.name or backend.name in self._backends:
            raise ValueError(f"a decoder backend needs a new name, not {backend.name!r}")
        self._backends[backend.name] = backend

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(self._backends.values())

    def handling(self, tsyntax: UID, *, reduced: bool) -> list[Backend]:
        """Backends of one kind that handle ``tsyntax``, available or not, in trying order."""
        rank = {name: i for i, name in enumerate(self.preference.get(tsyntax, ()))}
        mine = [
            b for b in self._backends.values() if b.reduced == reduced and tsyntax in b.syntaxes
        ]
        return sorted(mine, key=lambda b: (b.name not in rank, rank.get(b.name, 0), b.name))

    def pick(self, tsyntax: UID, *, reduced: bool) -> tuple[list[Backend], list[str]]:
        """The available backends in trying order, and why each of the others is not."""
        usable: list[Backend] = []
        missing: list[str] = []
        for backend in self.handling(tsyntax, reduced=reduced):
            why = backend.unavailable(tsyntax)
            if why is None:
                usable.append(backend)
            else:
                missing.append(why)
        return usable, missing

    def full_resolution(self, tsyntax: UID) -> list[Backend]:
        """The available full-resolution backends; ``InputError`` when there are none."""
        usable, missing = self.pick(tsyntax, reduced=False)
        if usable:
            return usable
        if not missing:
            kind = tsyntax.name if tsyntax.is_transfer_syntax else "unknown or private"
            raise InputError(
                f"{label('TransferSyntaxUID')} value '{tsyntax}' ({kind}) is not supported: "
                "no pixel data decoder exists for it"
            )
        raise InputError(
            f"{label('TransferSyntaxUID')} value '{tsyntax}' ({tsyntax.name}) cannot be "
            f"decoded: no decoder plugin is available ({'; '.join(missing)})"
        )


_BACKENDS: tuple[Backend, ...] = (
    Native(),
    PydicomPlugin("pylibjpeg"),
    PydicomPlugin("gdcm"),
    PydicomPlugin("pillow"),
    PydicomPlugin("pyjpegls"),
    PydicomPlugin("pydicom"),  # pydicom's own RLE decoder
    PillowJ2KReduce(),
    PillowJpegDraft(),
    NvImageCodec(),  # GPU; tried after the CPU decoders (tasks.device batches it on the GPU)
)

REGISTRY = Registry(_BACKENDS, PREFERENCE)


def check_decodable(tsyntax: UID, registry: Registry | None = None) -> None:
    """``InputError`` unless some full-resolution backend can decode ``tsyntax`` here."""
    (registry or REGISTRY).full_resolution(tsyntax)


def decode(
    ds: Dataset,
    tsyntax: UID,
    layout: PixelLayout,
    *,
    min_shape: tuple[int, int] | None = None,
    registry: Registry | None = None,
) -> Decoded:
    """Decode the single frame of ``ds``: its stored values, Bits Stored corrected.

    ``min_shape`` (rows, cols): when given, a reduced-resolution decode is attempted first, as
    small as possible but at least this size. ``InputError`` when the frame cannot be decoded.
    ``registry``: the backends to use (default: ``REGISTRY``, looked up at each call).
    """
    registry = registry or REGISTRY
    job = DecodeJob(ds, tsyntax, layout, min_shape)
    notes: dict[str, Any] = {}
    decoded = None
    if min_shape is not None and tsyntax.is_encapsulated:
        decoded = _reduced(job, registry, notes)
    if decoded is None:
        decoded = _full(job, registry, notes)
    arr, masked = correct_stored_bits(decoded.array, layout)
    return dataclasses.replace(decoded, array=arr, high_bits_masked=masked, notes=notes)


def _reduced(job: DecodeJob, registry: Registry, notes: dict[str, Any]) -> Decoded | None:
    backends, missing = registry.pick(job.tsyntax, reduced=True)
    if not backends:
        if missing:
            notes["reduced_fallback"] = "no reduced-resolution decoder is available: " + "; ".join(
                missing
            )
        return None
    try:
        job.frame()
    except Exception as exc:  # recorded; the full-resolution backends report the real problem
        notes["reduced_fallback"] = f"frame extraction failed: {one_line(exc)}"
        return None
    reasons: list[tuple[str, str]] = []
    for backend in backends:
        try:
            return backend.decode(job)
        except Decline as why:
            reasons.append((backend.name, str(why)))
        except Exception as exc:  # any failure: the next backend, then full resolution
            reasons.append((backend.name, f"{type(exc).__name__}: {one_line(exc)}"))
    if len(reasons) == 1:
        notes["reduced_fallback"] = reasons[0][1]
    else:
        notes["reduced_fallback"] = "; ".join(f"{name}: {why}" for name, why in reasons)
    return None


def _full(job: DecodeJob, registry: Registry, notes: dict[str, Any]) -> Decoded:
    failures: list[str] = []
    for backend in registry.full_resolution(job.tsyntax):
        try:
            decoded = backend.decode(job)
        except InputError:
            raise  # the data is unusable whichever backend reads it
        except Exception as exc:
            failures.append(f"{backend.name}: {one_line(exc, backend.name)}")
            continue
        if failures:
            notes["decoders_failed"] = failures
        return decoded
    raise InputError(
        f"decoding {job.tsyntax.name} pixel data failed with every available decoder: "
        + "; ".join(failures)
    )
