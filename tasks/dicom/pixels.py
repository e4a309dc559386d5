"""The pixel path: one DICOM radiograph in, the model's input tensor (and a thumbnail) out.

Training and inference both call :func:`preprocess`; its behaviour is fixed by a
:class:`model.spec.PreprocessSpec` whose hash is stored with every prediction.

The chain, in the order DICOM defines it (PS3.3 C.11, PS3.4 N.2):

1. decode the stored values (``tasks.dicom.decoders``; reduced resolution where the codec allows);
2. Bits Stored / Pixel Representation: stray high bits masked, signed values sign-extended;
3. modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence;
4. VOI: a VOI LUT Sequence, or the first Window Center/Width with its VOI LUT Function
   (LINEAR, LINEAR_EXACT, SIGMOID), or robust percentiles (per the spec's window policy),
   scaled to [0, 1];
5. MONOCHROME1 (or a Presentation LUT Shape of INVERSE) inverted *after* the VOI, so air is dark
   and bone bright in every output;
6. area (box) resize to ``input_size`` x ``input_size`` (and the thumbnail's size); replicate to
   ``channels``; normalise.

Steps 3-5 are composed into one function of the stored value, evaluated once per distinct
stored value (a table of at most 2^16 entries, :func:`display_table`). Step 6 is one pass over
the image for both outputs (:class:`BoxPlan`): each output pixel is the exact mean of a
rectangle of whole pixels, Pillow's BOX rule. The table is applied in that pass, a chunk of rows
at a time, as 16-bit levels (within 0.5/65535 of float64 arithmetic on every pixel, in the order
DICOM defines: window first, then resize; they do not commute where the window clips or is a
LUT); when the table is a straight line over the values the image holds (a window that clips
nothing), the line is applied to the box means instead (within 1e-9), and no lookup is done at
full resolution (:func:`box_means`).

What is refused (``InputError``, the file fails with the reason), besides what cannot be read or
decoded: a LUT or rescale that would put a NaN or an infinity into the model input, and an
image that is blank, or nearly constant after windowing (:data:`MIN_DISPLAY_SPREAD`). Shapes
that are not a radiograph's (a 1 x 5000 strip) are a policy matter: the selection policy skips
them before any decoding (``tasks.dicom.values.shape_problem``); the pixel path decodes any
size, so that it can read every test file. A VOI LUT or window that
cannot be used is not a failure: the next VOI in the policy is used and the reason is kept in
the ``window_rejected`` fact.

Alongside the tensor, :func:`preprocess` gives the image's content fingerprint
(``tasks.dicom.fingerprint``: ``px1`` from the full-resolution values, ``cs1`` from the
codestream when it decoded at reduced resolution), and ``facts``: only numbers, enumerated codes
and reasons this package composes, never free text from the header (LUT Explanation is not
copied), every string made safe for both databases (``tasks.dicom.values.safe_json``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from model.spec import PreprocessSpec
from tasks.dicom import fingerprint
from tasks.dicom.decoders import Decoded, PixelLayout, check_decodable, decode
from tasks.dicom.luts import read_lut
from tasks.dicom.outcomes import InputError
from tasks.dicom.tags import label, tag_id
from tasks.dicom.thumbnails import thumbnail_shape
from tasks.dicom.values import code, redact, safe_json, safe_text, shown, uid_problem

DEFAULT_MAX_PIXELS = 100_000_000
"""Refuse images with more samples than this (10,000 x 10,000) before decoding anything."""

REDUCED_MARGIN = 2.0
"""A reduced-resolution decode must keep at least this many pixels per model-input pixel.

Resampling a 1/2^k image to the input size places edges less precisely than resampling the
full image; with a margin of 1 (the smallest image that still covers 150 px) a chest CR
(RG1_J2KR) differs from the full-resolution tensor by up to 0.19 of the [0, 1] range at
collimator edges; with 2 by at most 0.08 (mean 0.003). On 2000 px images a margin of 2 means
k = 2 (1/4 scale): about 10-16x faster than a full lossless JPEG 2000 decode, 6-7x for lossy
JPEG 2000, whose full decode is cheaper (benchmarks/bench_decode.py). Thumbnails (for people,
not the model) get no margin.
"""

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

MIN_DISPLAY_SPREAD = 0.02
"""An image whose windowed values (1st to 99th percentile of its pixels) span less than this
part of the display range is nearly constant: a blank or failed exposure, or a window that
saturates the whole image. It is refused instead of scored. 0.02 is about 5 of 255 grey levels;
a windowed chest radiograph spans most of the range (the synthetic and real test images > 0.5).
"""
GUARD_PERCENTILES = (1.0, 99.0)

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Dataset


@dataclass(frozen=True)
class Preprocessed:
    """The model input for one image, its review thumbnail and what was done to get them."""

    image: np.ndarray  # float32 (channels, input_size, input_size), normalised
    thumbnail: np.ndarray | None  # uint8 (rows', cols') from the same windowed image
    facts: dict[str, Any] = field(default_factory=dict)  # JSON-able record of what was applied
    fingerprint: str = ""  # content fingerprint, "px2:..." or "cs1:..." (tasks.dicom.fingerprint)
    # where the native Pixel Data value the pixel fingerprint hashed lies in the bytes the data
    # set was read from (``fingerprint.native_span``); None when the fingerprint is not of them
    pixel_span: tuple[int, int] | None = None


def preprocess(
    src: Source,
    spec: PreprocessSpec,
    *,
    reduced: bool = True,
    thumbnail_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_margin: float = REDUCED_MARGIN,
    pixel_kind: str = fingerprint.PIXELS,
) -> Preprocessed:
    """Turn one DICOM image into the tensor ``spec`` describes.

    ``src`` is a path, the file's bytes, a binary file object, a ``pydicom.Dataset`` or a
    :class:`Parsed` data set (with its read warnings).
    ``reduced`` allows JPEG 2000 / baseline JPEG to be decoded at a reduced resolution that
    keeps at least ``reduce_margin`` x ``input_size`` pixels (and the thumbnail's size).
    ``thumbnail_size`` (long side, px) also returns an 8-bit thumbnail. ``max_pixels`` caps
    Rows x Columns x frames x samples, checked before decoding. ``pixel_kind``: the kind of
    pixel fingerprint to compute when the full image is decoded (``fingerprint.PIXEL_KINDS``).
    Raises :class:`InputError` (the reason names tag, value and rule) for any file that cannot
    be used.
    """
    ds, read_warnings = read_with_warnings(src)
    try:
        reduce_to = reduce_margin if reduced else None
        return _preprocess(
            ds, spec, reduce_to, thumbnail_size, max_pixels, read_warnings, pixel_kind
        )
    except InputError as exc:
        if read_warnings:  # e.g. "End of file reached before delimiter": the likely cause
            raise InputError(f"{exc} (while reading: {'; '.join(read_warnings)[:300]})") from exc
        raise


def _preprocess(
    ds: Dataset,
    spec: PreprocessSpec,
    reduce_margin: float | None,
    thumbnail_size: int | None,
    max_pixels: int,
    read_warnings: list[str],
    pixel_kind: str = fingerprint.PIXELS,
) -> Preprocessed:
    facts: dict[str, Any] = {"spec_sha256": spec.sha256}
    if read_warnings:
        facts["read_warnings"] = read_warnings
    ds, tsyntax = transfer_syntax(ds, facts)
    check_decodable(tsyntax)
    layout, photometric = check_image(ds, tsyntax, max_pixels)
    ds = with_photometric(ds, photometric)
    facts.update(
        rows=layout.rows,
        columns=layout.columns,
        bits_allocated=layout.bits_allocated,
        bits_stored=layout.bits_stored,
        pixel_representation=int(layout.signed),
        photometric=photometric,
    )

    size = spec.input_size
    thumb = thumbnail_shape(layout.rows, layout.columns, thumbnail_size) if thumbnail_size else None
    need = reduced_decode_floor(size, reduce_margin, thumb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about padding etc.; outcomes say enough
        decoded = decode(ds, tsyntax, layout, min_shape=need)
    facts.update(decode_facts(decoded))

    stored = decoded.array
    span = None
    if stored.shape == (layout.rows, layout.columns):
        content = fingerprint.of_pixels(ds, layout, photometric, stored, pixel_kind)
        span = fingerprint.native_span(ds, tsyntax)
    else:  # reduced resolution: the full-resolution values were never decoded
        content = fingerprint.of_codestream(ds, layout, photometric)
    modality = modality_transform(ds, layout)
    facts["modality_lut"] = modality.facts
    stats = StoredValues(stored, layout, padding=padding_range(ds, layout))
    check_finite(modality.fn(stats.domain), modality_source(modality))
    voi = voi_transform(ds, spec, modality, stats)
    facts["window"] = voi.facts
    if voi.rejected:
        facts["window_rejected"] = voi.rejected
    invert, invert_reason = inversion(ds, photometric)
    facts["inverted"] = invert
    if invert_reason:
        facts["inverted_by"] = invert_reason

    table = display_table(stats, modality, voi, invert)
    plan = box_plan(*stored.shape, ((size, size),) + ((thumb,) if thumb is not None else ()))
    means, facts["window_linear"] = box_means(stats, table, plan)
    # the exact guard needs the histogram; box means usually prove it passes without one
    if stats.padding is not None or stats.counts_known or not plan.clearly_not_constant(means):
        check_not_constant(table, stats, voi)
    small = means[0].astype(np.float32)
    image = np.empty((spec.channels, size, size), dtype=np.float32)
    for c in range(spec.channels):
        np.subtract(small, np.float32(spec.mean[c]), out=image[c])
        np.divide(image[c], np.float32(spec.std[c]), out=image[c])
    if not np.isfinite(image).all():  # cannot happen after the checks above; never scored
        raise InputError("the model input holds NaN or infinite values")
    thumbnail = None
    if thumb is not None:
        thumbnail = to_uint8(means[1])
        facts["thumbnail_shape"] = list(thumbnail.shape)
    facts["input_size"] = size
    return Preprocessed(
        image=image,
        thumbnail=thumbnail,
        facts=safe_json(facts),
        fingerprint=content,
        pixel_span=span,
    )


class Parsed(NamedTuple):
    """A data set already read (with what pydicom warned while reading it), for
    :func:`preprocess`: a decode worker parses each file once, for its header scan and for the
    pixel path (``tasks.dicom.headers.parse_bytes``)."""

    dataset: Dataset
    read_warnings: list[str]


def read_with_warnings(src: Source | Parsed) -> Parsed:
    """``read_dataset``, keeping pydicom's read warnings as :func:`pydicom_warnings` words them
    (a data set read already is returned as it is)."""
    if isinstance(src, Parsed):
        return src
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = read_dataset(src)
    return Parsed(ds, pydicom_warnings(caught))


def pydicom_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """What pydicom warned while reading a file, as a file's facts and reasons quote it."""
    # pydicom names the file in some warnings; the reason must not carry paths (they can hold
    # patient names), so drop that part
    # Only pydicom's own warnings describe the file; ``catch_warnings`` is process-wide, so
    # others (a ResourceWarning from another thread, say) can land here too.
    return [
        safe_text(redact(re.sub(r"\s+in file \S.*$", "", " ".join(str(w.message).split()))))
        for w in caught
        if f"{os.sep}pydicom{os.sep}" in (w.filename or "")
    ][:10]


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """[0, 1] float image to uint8 with rounding."""
    return np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)


# -- reading and validation -----------------------------------------------------------------


def read_dataset(src: Source) -> Dataset:
    """Read ``src`` into a Dataset (pixels included); InputError when it is not DICOM."""
    if isinstance(src, Dataset):
        return src
    if isinstance(src, bytes | bytearray | memoryview):
        if len(src) == 0:
            raise InputError("the file is empty (0 bytes)")
        return _parse(lambda: io.BytesIO(src))
    if isinstance(src, str | os.PathLike):
        try:
            size = os.stat(src).st_size
        except OSError as exc:
            raise InputError(f"cannot open the file: {exc.strerror}") from exc
        if size == 0:
            raise InputError("the file is empty (0 bytes)")

        @contextlib.contextmanager
        def opener():
            with open(src, "rb") as f:
                yield f

        return _parse(opener)
    if hasattr(src, "read"):
        start = src.tell() if hasattr(src, "tell") else 0
        if not src.read(1):
            raise InputError("the file is empty (0 bytes)")
        src.seek(start)

        def rewind():
            src.seek(start)
            return contextlib.nullcontext(src)

        return _parse(rewind)
    raise TypeError(f"src should be a path, bytes, a binary file or a Dataset, not {type(src)}")


def _parse(open_fp: Callable[[], Any]) -> Dataset:
    try:
        with _context(open_fp()) as fp:
            return dcmread(fp)
    except InvalidDicomError:  # no preamble / 'DICM' prefix: perhaps a bare data set
        return _parse_bare(open_fp)
    except Exception as exc:
        raise InputError(f"cannot parse the DICOM file: {type(exc).__name__}: {exc}") from exc


def _parse_bare(open_fp: Callable[[], Any]) -> Dataset:
    """A data set written without the preamble and file meta (old ACR-NEMA style files)."""
    try:
        with _context(open_fp()) as fp:
            ds = dcmread(fp, force=True)
    except Exception as exc:
        raise InputError(
            "not a DICOM file: no 'DICM' prefix at byte 128 and no data set could be parsed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if "PixelData" not in ds and "SOPClassUID" not in ds:
        raise InputError(
            "not a DICOM file: no 'DICM' prefix at byte 128 and no recognisable data set "
            f"(no {label('SOPClassUID')} or {label('PixelData')})"
        )
    return ds


def _context(obj: Any) -> Any:
    return obj if hasattr(obj, "__enter__") else contextlib.nullcontext(obj)


def transfer_syntax(ds: Dataset, facts: dict[str, Any]) -> tuple[Dataset, UID]:
    """The data set's transfer syntax; inferred from its encoding when the meta lacks it.

    When inferred, a shallow copy of ``ds`` carrying the inferred syntax is returned (the
    decoders read it from the file meta); the caller's data set is left alone.
    """
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        uid = UID(str(uid).strip("\x00 "))
        if problem := uid_problem(uid):
            raise InputError(f"{label('TransferSyntaxUID')} value is not a valid UID: {problem}")
        facts["transfer_syntax"] = str(uid)
        facts["transfer_syntax_name"] = uid.name
        return ds, uid
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise InputError(
            f"{label('TransferSyntaxUID')} is missing and {label('PixelData')} is "
            "encapsulated, so its compression cannot be known"
        )
    implicit, little = ds.original_encoding
    if implicit is None:
        uid = ExplicitVRLittleEndian
    elif not little:
        uid = ExplicitVRBigEndian
    else:
        uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    facts["transfer_syntax"] = str(uid)
    facts["transfer_syntax_name"] = uid.name
    facts["transfer_syntax_inferred"] = True
    new_meta = FileMetaDataset()
    for elem in meta or ():
        new_meta.add(elem)
    new_meta.TransferSyntaxUID = uid
    ds = copy.copy(ds)
    ds.file_meta = new_meta
    return ds, uid


def with_photometric(ds: Dataset, photometric: str) -> Dataset:
    """``ds`` with Photometric Interpretation as the code ``photometric`` (``monochrome2 `` ->
    ``MONOCHROME2``), which the decoders need; a copy when it changes, never the caller's."""
    if ds.get("PhotometricInterpretation") == photometric:
        return ds
    new = copy.copy(ds)
    new._dict = dict(ds._dict)  # pydicom's Dataset has no __copy__: elements would be shared
    new.add_new("PhotometricInterpretation", "CS", photometric)  # a new element, not the shared one
    return new


def _required_int(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InputError(f"{label(keyword)} is missing; it is required to read the pixels")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{label(keyword)} value {shown(value)} is not an integer") from None


def check_image(ds: Dataset, tsyntax: UID, max_pixels: int) -> tuple[PixelLayout, str]:
    """Validate the pixel attributes before any decoding; InputError names what is wrong."""
    if "PixelData" not in ds:
        for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                raise InputError(
                    f"{label(keyword)} is not supported: integer {label('PixelData')} is required"
                )
        raise InputError(f"{label('PixelData')} is missing: the data set holds no image")
    rows = _required_int(ds, "Rows")
    columns = _required_int(ds, "Columns")
    bits_allocated = _required_int(ds, "BitsAllocated")
    bits_stored = _required_int(ds, "BitsStored")
    pixel_representation = _required_int(ds, "PixelRepresentation")
    samples_value = ds.get("SamplesPerPixel", 1)
    try:
        samples = int(samples_value or 1)
    except (TypeError, ValueError):
        raise InputError(
            f"{label('SamplesPerPixel')} value {shown(samples_value)} is not an integer"
        ) from None
    frames_value = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_value or 1)
    except (TypeError, ValueError):
        raise InputError(
            f"{label('NumberOfFrames')} value {shown(frames_value)} is not an integer"
        ) from None
    # the same reading as the header scan's, so that selection and pixels agree
    photometric = code(ds.get("PhotometricInterpretation")) or ""

    if rows < 1 or columns < 1:
        raise InputError(
            f"{label('Rows')} x {label('Columns')} value {rows} x {columns} is invalid, "
            "both must be at least 1"
        )
    if bits_allocated not in (8, 16, 32):
        raise InputError(
            f"{label('BitsAllocated')} value '{bits_allocated}' is not supported, it must "
            "be 8, 16 or 32 for a grayscale radiograph"
        )
    if not 1 <= bits_stored <= bits_allocated:
        raise InputError(
            f"{label('BitsStored')} value '{bits_stored}' is invalid, it must be between 1 "
            f"and {label('BitsAllocated')} ({bits_allocated})"
        )
    if pixel_representation not in (0, 1):
        raise InputError(
            f"{label('PixelRepresentation')} value '{pixel_representation}' is invalid, it "
            "must be 0 (unsigned) or 1 (signed)"
        )
    if frames < 1:
        raise InputError(f"{label('NumberOfFrames')} value '{frames}' must be at least 1")
    total = rows * columns * frames * samples
    if total > max_pixels:
        raise InputError(
            f"image size {label('Rows')} {rows} x {label('Columns')} {columns} x "
            f"{frames} frame(s) x {samples} sample(s) = {total} samples "
            f"({total * bits_allocated // 8} bytes) exceeds the limit of {max_pixels} samples"
        )
    if frames > 1:
        raise InputError(
            f"{label('NumberOfFrames')} value '{frames}' is not supported: single-frame images only"
        )
    if samples != 1 or photometric not in GRAYSCALE:
        raise InputError(
            f"{label('PhotometricInterpretation')} value "
            f"{shown(photometric or '(missing)')} with "
            f"{label('SamplesPerPixel')} {samples} is not grayscale: the preprocessing "
            "spec needs MONOCHROME1 or MONOCHROME2"
        )
    if not tsyntax.is_encapsulated:
        expected = rows * columns * bits_allocated // 8
        have = len(ds.PixelData)
        if have < expected:
            raise InputError(
                f"{label('PixelData')} is truncated: {have} bytes present, {expected} "
                f"expected for {rows} x {columns} pixels of {bits_allocated} bits"
            )
    layout = PixelLayout(rows, columns, bits_allocated, bits_stored, bool(pixel_representation))
    return layout, photometric


def reduced_decode_floor(
    input_size: int, reduce_margin: float | None, thumb: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The smallest (rows, columns) a reduced-resolution decode may give: ``reduce_margin`` x
    the model input and the thumbnail's size; None when decoding at full resolution."""
    if reduce_margin is None:
        return None
    if reduce_margin < 1.0:
        raise ValueError(f"reduce_margin should be at least 1 instead of {reduce_margin}")
    model_need = math.ceil(input_size * reduce_margin)
    return (max(model_need, thumb[0] if thumb else 0), max(model_need, thumb[1] if thumb else 0))


def decode_facts(decoded: Decoded) -> dict[str, Any]:
    """The decoding facts recorded for every image (both pixel paths)."""
    out: dict[str, Any] = {
        "decoder": decoded.decoder,
        "reduce_level": decoded.reduce_level,
        "draft_scale": decoded.draft_scale,
        "decoded_shape": list(decoded.array.shape),
        "high_bits_masked": decoded.high_bits_masked,
    }
    out.update(decoded.notes)
    return out


# -- stored values ----------------------------------------------------------------------------


class StoredValues:
    """The decoded stored values with a lookup index over their distinct values.

    ``domain`` holds candidate stored values (sorted) and ``index`` maps each pixel to its
    position in ``domain``, so any function of the stored value can be applied as
    ``table[index]`` with ``table = f(domain)``. The histogram is computed on demand.
    """

    def __init__(
        self, arr: np.ndarray, layout: PixelLayout, padding: tuple[int, int] | None = None
    ) -> None:
        self.arr = arr
        self.padding = padding
        self.min = int(arr.min())
        self.max = int(arr.max())
        self._counts: np.ndarray | None = None
        if arr.dtype.itemsize <= 2 and arr.dtype.kind == "u":
            self.domain = np.arange(self.max + 1, dtype=np.int64)
            self._index = arr
        elif arr.dtype.itemsize <= 2:
            self.domain = np.arange(self.min, self.max + 1, dtype=np.int64)
            self._index = None  # computed lazily: arr - min as int32
        else:
            values, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
            self.domain = values.astype(np.int64)
            self._index = inverse.reshape(arr.shape)
            self._counts = counts

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            self._index = self.arr.astype(np.int32) - np.int32(self.min)
        return self._index

    def index_rows(self, start: int, stop: int) -> np.ndarray:
        """``index`` of rows ``start .. stop - 1`` (without making the whole ``index``)."""
        if self._index is not None:
            return self._index[start:stop]
        return np.subtract(self.arr[start:stop], self.min, dtype=np.intp)

    @property
    def counts_known(self) -> bool:
        return self._counts is not None

    @property
    def counts(self) -> np.ndarray:
        """Pixel count per ``domain`` value (counted a chunk of rows at a time)."""
        if self._counts is None:
            rows = self.arr.shape[0] if self.arr.ndim == 2 else 1
            step = max(1, CHUNK_PIXELS * rows // max(1, self.arr.size))
            counts = np.zeros(len(self.domain), dtype=np.int64)
            for start in range(0, rows, step):
                chunk = self.index_rows(start, start + step) if self.arr.ndim == 2 else self.index
                counts += np.bincount(chunk.ravel(), minlength=len(self.domain))
            self._counts = counts
        return self._counts

    def statistics_counts(self) -> tuple[np.ndarray, bool]:
        """Counts with Pixel Padding excluded (when that leaves any pixel); and whether it did."""
        counts = self.counts
        if self.padding is None:
            return counts, False
        low, high = self.padding
        keep = (self.domain < low) | (self.domain > high)
        if not np.any(counts[keep]):
            return counts, False
        return np.where(keep, counts, 0), True


def padding_range(ds: Dataset, layout: PixelLayout) -> tuple[int, int] | None:
    """Stored-value range of (0028,0120) Pixel Padding Value [.. (0028,0121) Range Limit]."""
    if "PixelPaddingValue" not in ds:
        return None
    values = [_as_stored(ds, "PixelPaddingValue", layout)]
    if "PixelPaddingRangeLimit" in ds:
        values.append(_as_stored(ds, "PixelPaddingRangeLimit", layout))
    return min(values), max(values)


def _as_stored(ds: Dataset, keyword: str, layout: PixelLayout) -> int:
    value = ds.get(keyword)
    try:
        v = int(_first(value))
    except (TypeError, ValueError, IndexError):
        raise InputError(f"{label(keyword)} value {shown(value)} is not an integer") from None
    if layout.signed and v >= 1 << 15:  # read as US although the pixels are signed
        v -= 1 << 16
    return v


def weighted_percentiles(
    values: np.ndarray, counts: np.ndarray, qs: tuple[float, ...]
) -> list[float]:
    """Percentiles of the multiset {values[i] repeated counts[i]}; values sorted ascending.

    Same definition as ``numpy.percentile`` (linear interpolation between order statistics).
    """
    cum = np.cumsum(counts)
    n = int(cum[-1])
    out = []
    for q in qs:
        rank = q / 100.0 * (n - 1)
        i = math.floor(rank)
        frac = rank - i
        a = float(values[np.searchsorted(cum, i, side="right")])
        b = float(values[np.searchsorted(cum, min(i + 1, n - 1), side="right")])
        out.append(a + (b - a) * frac)
    return out


# -- modality LUT -----------------------------------------------------------------------------


@dataclass
class Transform:
    """A pixel-value map ``fn`` (float64/int arrays in, float64 out) and what it is."""

    fn: Callable[[np.ndarray], np.ndarray]
    facts: dict[str, Any]
    increasing: bool = False  # known to preserve order (then sorting can be skipped)
    rejected: str | None = None  # why a DICOM VOI was not used


def modality_transform(ds: Dataset, layout: PixelLayout) -> Transform:
    """Stored values to modality values: Modality LUT Sequence, else Rescale Slope/Intercept."""
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        first, data, bits = read_lut(ds.ModalityLUTSequence[0], label("ModalityLUTSequence"))
        last = len(data) - 1
        lut = data.astype(np.float64)

        def apply_lut(x: np.ndarray) -> np.ndarray:
            return lut[np.clip(np.asarray(x, dtype=np.int64) - first, 0, last)]

        facts = {"source": "lut", "entries": len(data), "first_mapped": first, "bits": bits}
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            facts["rescale_ignored"] = True
        return Transform(apply_lut, facts)

    slope = _float_or(ds, "RescaleSlope", 1.0)
    intercept = _float_or(ds, "RescaleIntercept", 0.0)
    if slope == 0.0 or not math.isfinite(slope) or not math.isfinite(intercept):
        raise InputError(
            f"{label('RescaleSlope')} value {shown(ds.get('RescaleSlope'))} / "
            f"{label('RescaleIntercept')} value {shown(ds.get('RescaleIntercept'))} is invalid: "
            "the slope must be a finite non-zero number and the intercept finite"
        )
    facts = {"source": "rescale" if ("RescaleSlope" in ds or "RescaleIntercept" in ds) else "none"}
    facts.update(slope=slope, intercept=intercept)

    def apply_rescale(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * slope + intercept

    return Transform(apply_rescale, facts, increasing=slope > 0)


def _float_or(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label(keyword)} value {shown(value)} is not a number") from None


# -- VOI ----------------------------------------------------------------------------------------


def voi_transform(
    ds: Dataset, spec: PreprocessSpec, modality: Transform, stats: StoredValues
) -> Transform:
    """Modality values to [0, 1]: VOI LUT, window or percentiles, per the spec's policy."""
    rejected: list[str] = []
    if spec.window_policy == "dicom_or_percentile":
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            try:
                return _voi_lut(ds.VOILUTSequence[0])
            except InputError as exc:
                rejected.append(str(exc))
        if "WindowCenter" in ds and "WindowWidth" in ds:
            window = _window(ds)
            if isinstance(window, str):
                rejected.append(window)
            else:
                window.rejected = "; ".join(rejected) or None
                return window
    voi = _percentile_window(spec, modality, stats)
    voi.rejected = "; ".join(rejected) or None
    return voi


def _voi_lut(item: Dataset) -> Transform:
    first, data, bits = read_lut(item, label("VOILUTSequence"))
    top = float((1 << bits) - 1)
    peak = int(data.max()) if len(data) else 0
    scale = top if peak <= top else float((1 << int(peak).bit_length()) - 1)
    lut = data.astype(np.float64) / scale
    last = len(lut) - 1

    def apply(x: np.ndarray) -> np.ndarray:
        return lut[np.clip(np.rint(x).astype(np.int64) - first, 0, last)]

    facts = {
        "source": "voi_lut",
        "entries": len(lut),
        "first_mapped": first,
        "bits": bits,
        "output_scale": scale,
    }
    # (0028,3003) LUT Explanation is free text: never copied (it can hold anything, names too)
    return Transform(apply, facts)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, MultiValue | list | tuple) else value


def _window(ds: Dataset) -> Transform | str:
    """The first Window Center/Width as a transform, or why it cannot be used."""
    try:
        centre = float(_first(ds.WindowCenter))
        width = float(_first(ds.WindowWidth))
    except (TypeError, ValueError, IndexError):
        return (
            f"{label('WindowCenter')} {shown(ds.WindowCenter)} / {label('WindowWidth')} "
            f"{shown(ds.WindowWidth)} is not numeric"
        )
    function = code(ds.get("VOILUTFunction")) or "LINEAR"
    if function not in VOI_FUNCTIONS:
        return (
            f"{label('VOILUTFunction')} value {shown(function)} is not one of "
            f"{', '.join(VOI_FUNCTIONS)}"
        )
    if not (math.isfinite(centre) and math.isfinite(width)):
        return (
            f"{tag_id('WindowCenter')}/{tag_id('WindowWidth')} window {centre}/{width} is not "
            "finite"
        )
    minimum = 1.0 if function == "LINEAR" else 0.0
    if width < minimum or (function != "LINEAR" and width == 0):
        rule = ">= 1" if function == "LINEAR" else "> 0"
        return f"{label('WindowWidth')} value '{width:g}' is invalid, it must be {rule}"
    facts = {"source": "window", "center": centre, "width": width, "function": function}
    if ds["WindowCenter"].VM > 1:
        facts["windows_available"] = int(ds["WindowCenter"].VM)  # the first one is used
    if function == "SIGMOID":

        def sigmoid(x: np.ndarray) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-4.0 * (np.asarray(x, dtype=np.float64) - centre) / width))

        return Transform(sigmoid, facts)
    if function == "LINEAR" and width == 1.0:

        def threshold(x: np.ndarray) -> np.ndarray:
            return (np.asarray(x, dtype=np.float64) > centre - 0.5).astype(np.float64)

        return Transform(threshold, facts)
    if function == "LINEAR":  # PS3.3 C.11.2.1.2.1
        a = 1.0 / (width - 1.0)
        b = 0.5 - (centre - 0.5) * a
    else:  # LINEAR_EXACT, C.11.2.1.3.2
        a = 1.0 / width
        b = 0.5 - centre * a
    return Transform(_clipped_line(a, b), facts)


def _clipped_line(a: float, b: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(x: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=np.float64) * a + b, 0.0, 1.0)

    return apply


def _percentile_window(spec: PreprocessSpec, modality: Transform, stats: StoredValues) -> Transform:
    counts, padding_excluded = stats.statistics_counts()
    present = counts > 0
    values = modality.fn(stats.domain[present])
    weights = counts[present]
    if not modality.increasing:
        order = np.argsort(values, kind="stable")
        values, weights = values[order], weights[order]
    low, high = weighted_percentiles(values, weights, spec.percentiles)
    facts: dict[str, Any] = {
        "source": "percentile",
        "percentiles": list(spec.percentiles),
        "values": [low, high],
    }
    if padding_excluded:
        facts["padding_excluded"] = list(stats.padding)  # type: ignore[arg-type]
    if high <= low:
        facts["degenerate"] = True  # constant image: everything maps to 0
        high = low + 1.0
    a = 1.0 / (high - low)
    b = -low * a
    return Transform(_clipped_line(a, b), facts)


def inversion(ds: Dataset, photometric: str) -> tuple[bool, str | None]:
    """Whether to invert after the VOI so that higher output means brighter (bone)."""
    if photometric == "MONOCHROME1":
        return True, f"{label('PhotometricInterpretation')} MONOCHROME1"
    shape = code(ds.get("PresentationLUTShape")) or ""
    if shape == "INVERSE":
        return True, f"{label('PresentationLUTShape')} INVERSE"
    return False, None


# -- window + resize ----------------------------------------------------------------------------


DISPLAY_LEVELS = 65535
"""The windowed [0, 1] image is held as uint16 (value * 65535) while it is resized."""


def modality_source(modality: Transform) -> str:
    """How a message names the modality transform."""
    if modality.facts.get("source") == "lut":
        return label("ModalityLUTSequence")
    return f"{label('RescaleSlope')} / {label('RescaleIntercept')}"


def voi_source(voi: Transform) -> str:
    """How a message names the VOI transform that was applied."""
    facts = voi.facts
    if facts.get("source") == "voi_lut":
        return label("VOILUTSequence")
    if facts.get("source") == "window":
        return (
            f"{label('WindowCenter')} / {label('WindowWidth')} "
            f"{facts['center']:g} / {facts['width']:g} ({facts['function']})"
        )
    low, high = facts.get("percentiles", (0, 100))
    return f"the {low:g}-{high:g} percentile window"


def check_finite(values: np.ndarray, source: str) -> None:
    """``InputError`` unless every value is finite (no NaN or infinity reaches the model)."""
    if not np.isfinite(values).all():
        raise InputError(
            f"{source} maps stored values to NaN or infinite values; the image cannot be windowed"
        )


def display_table(
    stats: StoredValues, modality: Transform, voi: Transform, invert: bool
) -> np.ndarray:
    """The displayed value in [0, 1] of every ``stats.domain`` value: modality, VOI, inversion."""
    table = voi.fn(modality.fn(stats.domain))
    check_finite(table, voi_source(voi))
    if invert:
        table = 1.0 - table
    return np.clip(table, 0.0, 1.0)


def check_not_constant(table: np.ndarray, stats: StoredValues, voi: Transform) -> None:
    """``InputError`` for a blank image, or one that windowing leaves nearly constant: the
    1st-99th percentile of its displayed pixels (Pixel Padding excluded) spans less than
    :data:`MIN_DISPLAY_SPREAD` of the display range."""
    counts, _ = stats.statistics_counts()
    present = counts > 0
    values, weights = table[present], counts[present]
    order = np.argsort(values, kind="stable")
    low, high = weighted_percentiles(values[order], weights[order], GUARD_PERCENTILES)
    spread = high - low
    if spread >= MIN_DISPLAY_SPREAD:
        return
    if stats.min == stats.max:
        raise InputError(
            f"the image is blank: every pixel of {label('PixelData')} holds the stored value "
            f"{stats.min}"
        )
    raise InputError(
        f"the image is nearly constant after {voi_source(voi)}: 98% of its pixels span "
        f"{spread:.1%} of the display range, under the {MIN_DISPLAY_SPREAD:.0%} an image needs"
    )


# -- one reduction pass: window, then box means for the model input and the thumbnail ----------


CHUNK_PIXELS = 1 << 16
"""Rows are windowed and summed in chunks of about this many pixels, so that a chunk, its
lookup index and its display levels stay in a core's L2 cache instead of making full-size
temporaries (a 2000 px image's int64 index alone was 30 MB)."""

LINEAR_TOLERANCE = 1e-9
"""The display table is a straight line over the image's stored values when no entry is further
than this from the line through its ends ([0, 1] units). The line is then applied to box means
of the stored values, which equals the box mean of the line's values to within this bound
(a mean commutes with a linear map), and no table lookup is done at full resolution."""

GUARD_BINS = 4096
GUARD_MARGIN = 2e-5
"""Slack for :meth:`BoxPlan.clearly_not_constant` on means of 16-bit levels: each level is
within 0.5/65535 of the exact display value, so a difference of two means within 1/65535."""


@functools.lru_cache(maxsize=512)
def box_bounds(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, count): output pixel ``j`` of an area (BOX) resize from ``in_size`` to
    ``out_size`` pixels is the mean of input pixels ``first[j] .. first[j] + count[j] - 1``.

    The rule is Pillow's (``precompute_coeffs`` for its BOX filter), evaluated with the same
    double-precision operations: ``center = (j + 0.5) * scale``; candidates
    ``int(center - support + 0.5) .. int(center + support + 0.5) - 1`` clipped to the image;
    weight 1 where ``-0.5 < (x - center + 0.5) / filterscale <= 0.5``. A pixel counts whole for
    the output pixel its centre falls in: when shrinking, the boxes cut the input into runs of
    whole pixels; when enlarging, each output pixel takes one input pixel. The arrays are
    cached and read-only.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, not {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    low = np.maximum((center - support + 0.5).astype(np.int64), 0)
    high = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    width = max(int((high - low).max()), 1)
    x = low[:, None] + np.arange(width)[None, :]
    arg = (x.astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    ones = (arg > -0.5) & (arg <= 0.5) & (x < high[:, None])
    count = ones.sum(axis=1)
    if not count.all():  # cannot happen for sizes >= 1; Pillow would write 0 there
        raise ValueError(f"an output pixel of {in_size} -> {out_size} has no input pixel")
    first = low + np.argmax(ones, axis=1)
    for arr in (first, count):
        arr.flags.writeable = False
    return first, count


@functools.lru_cache(maxsize=64)
def box_plan(rows: int, columns: int, shapes: tuple[tuple[int, int], ...]) -> BoxPlan:
    """The :class:`BoxPlan` for an image size and output shapes (kept: an archive has few
    distinct sizes, and making a plan costs ~0.3 ms)."""
    return BoxPlan(rows, columns, list(shapes))


class BoxPlan:
    """Box means of one image for several output shapes (model input, thumbnail) in one pass.

    Every output pixel of :func:`box_bounds` is a rectangle of whole input pixels. The row
    boundaries of all the shapes cut the image's rows into segments (2000 rows to 150 and 256:
    386 segments of 1-8 rows); :meth:`sum_rows` sums each segment's rows in one pass over the
    image (exact integers), and :meth:`means` gets each output pixel's sum as differences of
    prefix sums over the segments and columns (small arrays). The means are exact for every
    shape: no rounding between passes (Pillow's 16-bit resampler rounds after each of its two)
    and no subsampling for the thumbnail.
    """

    def __init__(self, rows: int, columns: int, shapes: list[tuple[int, int]]) -> None:
        self.rows, self.columns = rows, columns
        self.shapes = [(int(r), int(c)) for r, c in shapes]
        self.row_boxes = [box_bounds(rows, r) for r, _ in self.shapes]
        self.column_boxes = [box_bounds(columns, c) for _, c in self.shapes]
        self.cuts = np.unique(
            np.concatenate([np.concatenate([f, f + n]) for f, n in self.row_boxes])
        )
        self.cuts.flags.writeable = False  # plans are shared (box_plan)
        self.edges = np.unique(
            np.concatenate([np.concatenate([f, f + n]) for f, n in self.column_boxes])
        )
        # per shape: each box's column edges and row cuts as positions in edges / cuts, and
        # its pixel count
        self._lookups = [
            (
                np.searchsorted(self.edges, cf),
                np.searchsorted(self.edges, cf + cn),
                np.searchsorted(self.cuts, rf),
                np.searchsorted(self.cuts, rf + rn),
            )
            for (rf, rn), (cf, cn) in zip(self.row_boxes, self.column_boxes, strict=True)
        ]
        self._pixels = [
            np.outer(rn, cn).astype(np.float64)
            for (_, rn), (_, cn) in zip(self.row_boxes, self.column_boxes, strict=True)
        ]
        cuts = self.cuts.tolist()
        self.longest = max(b - a for a, b in itertools.pairwise(cuts))
        # chunks of consecutive segments, about CHUNK_PIXELS pixels each: (first row, last row
        # + 1, [(segment, first row, last row + 1) relative to the chunk])
        per_chunk = max(1, CHUNK_PIXELS // columns)
        self.chunks: list[tuple[int, int, list[tuple[int, int, int]]]] = []
        s = 0
        while s < len(cuts) - 1:
            start, e = cuts[s], s + 1
            while e < len(cuts) - 1 and cuts[e + 1] - start <= per_chunk:
                e += 1
            segments = [(k, cuts[k] - start, cuts[k + 1] - start) for k in range(s, e)]
            self.chunks.append((start, cuts[e], segments))
            s = e

    def sum_rows(self, rows_of: Callable[[int, int], np.ndarray], largest: int) -> np.ndarray:
        """(segments, columns) sums of the rows of each segment; ``rows_of(a, b)`` gives rows
        ``a .. b - 1`` of the values to average (a chunk at a time), ``largest`` bounds their
        magnitude (it picks an accumulator that cannot overflow)."""
        dtype = np.int32 if self.longest * largest < 1 << 31 else np.int64
        out = np.empty((len(self.cuts) - 1, self.columns), dtype=dtype)
        for start, stop, segments in self.chunks:
            block = rows_of(start, stop)
            for k, a, b in segments:
                np.add.reduce(block[a:b], axis=0, dtype=dtype, out=out[k])
        return out

    def means(self, sums: np.ndarray) -> list[np.ndarray]:
        """float64 box means for each shape from :meth:`sum_rows`'s segment sums."""
        # the image's integral (sum of everything above and left of a point), at the shapes'
        # column edges x row cuts; numpy scans only the last axis fast, so the table is held
        # transposed: integral[e, r] for column edge ``edges[e]`` and row cut ``cuts[r]``
        segments = len(sums)
        prefix = np.empty((segments, self.columns + 1), dtype=np.int64)
        prefix[:, 0] = 0
        np.cumsum(sums, axis=1, dtype=np.int64, out=prefix[:, 1:])
        edges = self.edges
        integral = np.empty((len(edges), segments + 1), dtype=np.int64)
        integral[:, 0] = 0
        np.cumsum(np.ascontiguousarray(prefix[:, edges].T), axis=1, out=integral[:, 1:])
        out = []
        for (left, right, top, bottom), pixels in zip(self._lookups, self._pixels, strict=True):
            # whole-row gathers only (fast): columns first, then rows of the transpose
            across = np.ascontiguousarray((integral[right] - integral[left]).T)
            out.append((across[bottom] - across[top]) / pixels)
        return out

    def partitions(self, k: int) -> bool:
        """Whether shape ``k``'s boxes hold every pixel of the image exactly once."""
        return all(
            first[0] == 0
            and first[-1] + count[-1] == size
            and np.array_equal(first[1:], first[:-1] + count[:-1])
            for (first, count), size in (
                (self.row_boxes[k], self.rows),
                (self.column_boxes[k], self.columns),
            )
        )

    def clearly_not_constant(self, means: list[np.ndarray]) -> bool:
        """True when the box means prove that the image passes :func:`check_not_constant`:
        the 1st-99th percentile spread of its displayed pixels is at least
        :data:`MIN_DISPLAY_SPREAD`. False proves nothing (the histogram then decides).

        Why: were the spread below s = MIN_DISPLAY_SPREAD, the interval I = [P1, P99] would hold
        all pixels ranked from ceil(0.01 (n - 1)) to floor(0.99 (n - 1)), so at most
        D = 0.02 n + 2 pixels lie outside it, each at most 1 away (values are in [0, 1]). A box
        mean is no further from I than the mean distance of its pixels, so boxes whose mean is
        more than d from I hold fewer than D / d pixels. Hence the boxes with the lowest means
        that together hold at least D / d pixels include one within d of I: its mean, and so
        the highest of theirs (``low``), is >= P1 - d; likewise ``high`` <= P99 + d, and
        high - low < s + 2 d. A difference of s + 2 d or more (plus :data:`GUARD_MARGIN`) for
        any d therefore proves the spread is at least s. Needs boxes that hold every pixel
        exactly once (shrinking); Pixel Padding (left out of the guard's statistics) is the
        caller's to exclude.
        """
        for k in sorted(range(len(self.shapes)), key=lambda i: -means[i].size):
            if not self.partitions(k):
                continue
            # pixels per box, histogrammed by mean in bins of 1/GUARD_BINS: ``low`` is taken at
            # its bin's upper edge and ``high`` at its bin's lower edge (conservative)
            weights = np.outer(self.row_boxes[k][1], self.column_boxes[k][1]).ravel()
            bins = np.clip((means[k].ravel() * GUARD_BINS).astype(np.intp), 0, GUARD_BINS - 1)
            per_bin = np.bincount(bins, weights=weights, minlength=GUARD_BINS)
            upto = np.cumsum(per_bin)  # pixels in bins 0..i
            n = float(upto[-1])
            from_top = n - upto + per_bin  # pixels in bins i..end
            spread = (GUARD_PERCENTILES[1] - GUARD_PERCENTILES[0]) / 100.0
            outside = (1.0 - spread) * n + 2.0
            for d in (0.05, 0.1, 0.2, 0.3):
                need = outside / d
                if need > n:
                    continue
                low = (int(np.searchsorted(upto, need)) + 1) / GUARD_BINS
                high = (int(np.searchsorted(-from_top, -need, side="right")) - 1) / GUARD_BINS
                if high - low >= MIN_DISPLAY_SPREAD + 2 * d + GUARD_MARGIN:
                    return True
            return False
        return False


def display_line(table: np.ndarray, stats: StoredValues) -> tuple[float, float] | None:
    """(displayed value of ``stats.min``, slope per stored unit) when ``table`` is a straight
    line over the stored values ``stats.min .. stats.max`` (to :data:`LINEAR_TOLERANCE`): a
    modality rescale with a linear window that clips nothing the image holds. None otherwise
    (the window clips, a sigmoid, a LUT)."""
    start = int(np.searchsorted(stats.domain, stats.min))
    stop = int(np.searchsorted(stats.domain, stats.max, side="right"))
    x, t = stats.domain[start:stop], table[start:stop]
    if len(t) == 0:
        return None
    if len(t) == 1:
        return float(t[0]), 0.0
    slope = (t[-1] - t[0]) / float(x[-1] - x[0])
    if np.max(np.abs(t - (t[0] + slope * (x - x[0])))) > LINEAR_TOLERANCE:
        return None
    return float(t[0]), float(slope)


def box_means(
    stats: StoredValues, table: np.ndarray, plan: BoxPlan
) -> tuple[list[np.ndarray], bool]:
    """The displayed image (``table`` of each pixel's stored value, DICOM order: window
    first), box-averaged to each of ``plan.shapes`` in one pass: float64 [0, 1] images, and
    whether the straight-line path was taken.

    Straight line (:func:`display_line`): box means of the stored values, then the line; no
    lookup at full resolution; within :data:`LINEAR_TOLERANCE` (+ float64 rounding) of
    float64 arithmetic on every pixel. Otherwise the table is quantised to 16 bits (1/65535),
    looked up a chunk of rows at a time and the levels summed exactly: within 0.5/65535
    (7.7e-6) of float64 arithmetic on every pixel followed by an exact box mean, whether or not
    the window clips. (Until 2026-11 the path rounded twice more in Pillow's resampler, up to
    3.1e-5, and subsampled the thumbnail.)
    """
    line = display_line(table, stats)
    if line is not None:
        value, slope = line
        largest = max(abs(stats.min), abs(stats.max))
        sums = plan.sum_rows(lambda a, b: stats.arr[a:b], largest)
        low = stats.min
        return [np.clip(value + slope * (m - low), 0.0, 1.0) for m in plan.means(sums)], True
    levels = np.rint(table * DISPLAY_LEVELS).astype(np.uint16)
    sums = plan.sum_rows(lambda a, b: levels.take(stats.index_rows(a, b)), DISPLAY_LEVELS)
    return [m / DISPLAY_LEVELS for m in plan.means(sums)], False
