"""The decode workers' half of the device pixel path: read, parse, hand over.

A worker reads the file, hashes it, parses it and validates the pixel attributes exactly as the
CPU path does (``tasks.dicom.pixels``: ``read_dataset``, ``transfer_syntax``, ``check_image``),
then hands over one of:

* ``pixels``: the stored values at their native type (uncompressed data as read, RLE, JPEG-LS,
  lossless JPEG, and JPEG 2000 / JPEG when no device decoder takes them, decoded here by
  ``tasks.dicom.decoders`` with reduced resolution where the CPU path would use it), Bits Stored
  corrected (so within the range Bits Stored allows: the device counts that range);
* ``frame``: the compressed frame (JPEG 2000, JPEG) untouched, for the device decoder of the
  process that owns the GPU (``device_syntaxes`` says which syntaxes it takes);
* ``done``: the CPU path's finished result, for what the device path does not do (32-bit stored
  values: their lookup table is not a dense range).

No window, no lookup, no resize and no histogram here: those run on the device
(``tasks.device.pipeline``). The large buffer goes into the shard's shared-memory arena when
the caller gave this file a slot (``tasks.device.arena``), else it travels inline (pickled).

A worker is given ``tasks.ingest.decode_item``'s own arguments (read by name) and fills the
same ``tasks.ingest.Decoded`` record: the file's content hash, the content fingerprints (both
kinds when asked, as ``decode_item`` does) and the facts the CPU path records up to decoding;
the device half adds the rest. So both paths store the same instance rows. Besides the buffer,
only a pixel-less copy of the few header attributes the display table needs
(:data:`TABLE_KEYWORDS`) leaves the worker, never the whole header.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

from model.spec import PreprocessSpec
from tasks.device import arena
from tasks.dicom import fingerprint
from tasks.dicom import pixels as px
from tasks.dicom.decoders import PixelLayout, check_decodable, decode
from tasks.dicom.discovery import SourceFile
from tasks.dicom.outcomes import InputError
from tasks.dicom.thumbnails import thumbnail_shape
from tasks.ingest import Decoded as Record
from tasks.ingest import call_arguments, identify, thumbnail_path_for, worker_scan

TABLE_KEYWORDS = (
    "PhotometricInterpretation",
    "PresentationLUTShape",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
)
"""The attributes ``tasks.dicom.pixels`` reads to build the display table (modality LUT, VOI,
inversion, padding): the only part of the header that leaves the worker."""

PIXELS, FRAME, DONE = "pixels", "frame", "done"


@dataclass
class Prepared:
    """One file after the worker's half of the device path (picklable, small unless inline).

    ``record`` is the ``tasks.ingest.Decoded`` the CPU path would return, less the image and
    the thumbnail (the device half fills those in and completes its facts).
    """

    record: Record
    kind: str = PIXELS  # PIXELS, FRAME or DONE; meaningless when the record has an error
    read_warnings: list[str] = field(default_factory=list)
    header: Dataset | None = None  # TABLE_KEYWORDS only
    layout: PixelLayout | None = None
    photometric: str = ""
    thumb_shape: tuple[int, int] | None = None  # from Rows x Columns, as the CPU path
    thumbnail_path: str | None = None  # where the review thumbnail goes (None: none)
    # the buffer: stored values (PIXELS) or the frame's bytes (FRAME)
    shape: tuple[int, ...] = ()
    dtype: str = ""
    slot: tuple[int, int] | None = None  # (offset, bytes) in the shard's arena
    data: np.ndarray | None = None  # inline buffer when there is no slot
    # DONE: the CPU path's outputs
    image: np.ndarray | None = None
    thumbnail: np.ndarray | None = None

    @property
    def error(self) -> str | None:
        return self.record.error

    @property
    def settled(self) -> bool:
        """Nothing to render: failed, or ended by the worker's scan (skipped, failed, or
        already predicted from this URI)."""
        r = self.record
        return r.error is not None or r.scan_outcome is not None or r.already_done

    @property
    def facts(self) -> dict[str, Any]:
        return self.record.facts


@dataclass(frozen=True)
class Options:
    """What the device's owner decides for every file (one picklable value per job)."""

    device_syntaxes: frozenset[str] = frozenset()  # handed over as FRAME
    max_pixels: int = px.DEFAULT_MAX_PIXELS
    reduce_margin: float = px.REDUCED_MARGIN


def prepare_item(
    src: SourceFile,
    call: tuple,
    options: Options,
    arena_name: str | None = None,
    slot: tuple | None = None,
) -> Prepared:
    """The worker's half for one selected file; a failure is returned, never raised.

    ``call``: the arguments ``tasks.ingest.decode_item`` would get for this file (its first is
    ``src``). ``arena_name``/``slot``: where to put the buffer ((offset, capacity) in that
    arena). Module-level and picklable so that a spawn-context process pool can run it.
    """
    args = call_arguments(call)
    out = Prepared(Record(src.uri))
    try:
        data = src.read_bytes()
        parsed = None
        if args["scan"] is not None:  # not scanned yet: scan it from the bytes read
            found = worker_scan(src, data, args["scan"])
            if isinstance(found, Record):
                return Prepared(found)  # skipped, failed or already predicted: ``settled``
            out.record.header, parsed = found.header, found.parsed
            both, kind, stored = found.rule
            args |= {
                "sop_instance_uid": found.header.sop_instance_uid,
                "both_fingerprints": both,
                "pixel_kind": kind,
                "stored_content_sha256": stored,
            }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            known, span = _prepare(parsed or data, args, options, out)
            identify(
                out.record,
                data,
                known,
                span,
                both_fingerprints=args["both_fingerprints"],
                pixel_kind=args["pixel_kind"],
                stored_content_sha256=args["stored_content_sha256"],
            )
    except InputError as exc:
        reason = str(exc)
        if out.read_warnings:  # as tasks.dicom.pixels.preprocess words it
            reason = f"{reason} (while reading: {'; '.join(out.read_warnings)[:300]})"
        return _failed(out, reason)
    except MemoryError:
        return _failed(out, "out of memory while decoding the image")
    except Exception as exc:  # a decoder bug must not stop the batch
        return _failed(out, f"unexpected error while decoding: {type(exc).__name__}: {exc}")
    if args.get("thumbnails_dir") and out.thumb_shape is not None:
        path = thumbnail_path_for(args["thumbnails_dir"], args["sop_instance_uid"])
        out.thumbnail_path = str(path)
    _place(out, arena_name, slot)
    return out


def prepare_many(jobs: list[tuple]) -> list[Prepared]:
    """``prepare_item`` over a chunk of files (one pool task per chunk)."""
    return [prepare_item(*job) for job in jobs]


def _failed(out: Prepared, reason: str) -> Prepared:
    record = out.record
    return Prepared(
        Record(record.uri, content_sha256=record.content_sha256, error=reason, header=record.header)
    )


def _prepare(
    data: bytes | px.Parsed, args: dict[str, Any], options: Options, out: Prepared
) -> tuple[str, tuple[int, int] | None]:
    """Fill ``out``; returns the content fingerprint the pixel path computed and, for a ``px1``
    of native pixel data, where that data lies in ``data`` (``fingerprint.native_span``)."""
    spec = PreprocessSpec.from_dict(args["spec_dict"])
    reduced = bool(args.get("reduced", True))
    size = args.get("thumbnail_size") if args.get("thumbnails_dir") else None
    ds, out.read_warnings = px.read_with_warnings(data)
    facts: dict[str, Any] = {"spec_sha256": spec.sha256}
    if out.read_warnings:
        facts["read_warnings"] = out.read_warnings
    original = ds
    ds, tsyntax = px.transfer_syntax(ds, facts)
    check_decodable(tsyntax)
    layout, photometric = px.check_image(ds, tsyntax, options.max_pixels)
    ds = px.with_photometric(ds, photometric)
    if layout.bits_allocated > 16:  # no dense lookup table: the CPU path does the whole image
        return _done(original, spec, reduced, size, options, out, args["pixel_kind"])
    facts.update(
        rows=layout.rows,
        columns=layout.columns,
        bits_allocated=layout.bits_allocated,
        bits_stored=layout.bits_stored,
        pixel_representation=int(layout.signed),
        photometric=photometric,
    )
    out.layout, out.photometric = layout, photometric
    out.thumb_shape = thumbnail_shape(layout.rows, layout.columns, size) if size else None
    out.header = table_header(ds)
    if str(tsyntax) in options.device_syntaxes and (frame := _frame(ds)) is not None:
        out.kind, out.data, out.shape, out.dtype = FRAME, frame, frame.shape, frame.dtype.str
        out.record.facts = facts
        return fingerprint.of_codestream(ds, layout, photometric), None
    need = px.reduced_decode_floor(
        spec.input_size, options.reduce_margin if reduced else None, out.thumb_shape
    )
    decoded = decode(ds, tsyntax, layout, min_shape=need)
    facts.update(px.decode_facts(decoded))
    stored = decoded.array
    span = None
    if stored.shape == (layout.rows, layout.columns):
        known = fingerprint.of_pixels(ds, layout, photometric, stored, args["pixel_kind"])
        span = fingerprint.native_span(ds, tsyntax)
    else:  # reduced resolution: the full-resolution values were never decoded
        known = fingerprint.of_codestream(ds, layout, photometric)
    stored = stored.astype(stored.dtype.newbyteorder("="), copy=False)
    out.kind, out.data, out.shape, out.dtype = PIXELS, stored, stored.shape, stored.dtype.str
    out.record.facts = facts
    return known, span


def _frame(ds: Dataset) -> np.ndarray | None:
    """The single encapsulated frame's bytes; None when the encapsulation cannot be read (the
    CPU decoders then report the problem as the CPU path does)."""
    try:
        return np.frombuffer(get_frame(ds.PixelData, 0, number_of_frames=1), dtype=np.uint8)
    except Exception:
        return None


def table_header(ds: Dataset) -> Dataset:
    """A pixel-less data set holding only :data:`TABLE_KEYWORDS` (those present)."""
    header = Dataset()
    for keyword in TABLE_KEYWORDS:
        if keyword in ds:
            header[keyword] = ds[keyword]
    return header


def _done(
    ds: Dataset,
    spec: PreprocessSpec,
    reduced: bool,
    thumbnail_size: int | None,
    options: Options,
    out: Prepared,
    pixel_kind: str,
) -> tuple[str, tuple[int, int] | None]:
    pre = px.preprocess(
        ds,
        spec,
        reduced=reduced,
        thumbnail_size=thumbnail_size,
        max_pixels=options.max_pixels,
        reduce_margin=options.reduce_margin,
        pixel_kind=pixel_kind,
    )
    facts = dict(pre.facts)
    if out.read_warnings:
        facts["read_warnings"] = out.read_warnings
    facts["pixel_path"] = "cpu"
    out.kind, out.image, out.thumbnail = DONE, pre.image, pre.thumbnail
    if pre.thumbnail is not None:
        out.thumb_shape = tuple(pre.thumbnail.shape)  # type: ignore[assignment]
    out.record.facts = facts
    return pre.fingerprint, pre.pixel_span


def _place(out: Prepared, arena_name: str | None, slot: tuple | None) -> None:
    """Move the buffer into the arena slot when it fits (else it stays inline)."""
    if out.record.error is not None or out.data is None or arena_name is None or slot is None:
        return
    offset, capacity = slot
    buffer = np.ascontiguousarray(out.data)
    if buffer.nbytes > capacity:
        return  # larger than the header promised (a reduced decode never is): inline
    view = arena.attach(arena_name).view(offset, buffer.shape, buffer.dtype)
    np.copyto(view, buffer)
    out.slot = (offset, buffer.nbytes)
    out.data = None
