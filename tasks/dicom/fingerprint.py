"""Content fingerprints: is this file the same image as one seen before, whatever its encoding?

A DICOM instance is its SOP Instance UID, and DICOM lets an instance be re-encoded losslessly
under the same UID: an implicit VR copy (``dcmconv +ti``), RLE, lossless JPEG, JPEG-LS or
JPEG 2000 lossless. The file's bytes then differ, the image does not. A fingerprint hashes what
the image *is*: its decoded stored values and the few attributes that change what those values
mean, so lossless copies share it and a lossy copy (other values) does not.

Kinds, told apart by their prefix (``kind:hex``; the kind names the definition, and a new
definition gets a new kind rather than silently new values):

``px2:<xxh3-128>`` (:data:`PIXELS`)
    The full-resolution stored values (after Bits Stored / Pixel Representation correction, as
    little-endian integers of the type Bits Allocated and Pixel Representation give) and the
    :func:`meaning` attributes, hashed with XXH3-128. Computed by the pixel path whenever it
    decoded the full image, and on demand by :func:`identity.pixel_fingerprint` (a full decode,
    no windowing or resizing; ``identity`` is :mod:`tasks.dicom.identity`, which imports the
    pixel path). Same value for every lossless encoding of the same values. For a lossy syntax
    (baseline or extended JPEG, JPEG 2000 with the irreversible wavelet) it is a hash of what
    *this* decoder produced: another decoder (or version) may differ by a unit here and there,
    so a lossy file can fail to match itself decoded elsewhere. That errs towards "different",
    never "same".

``px1:<sha256>`` (:data:`PIXELS_SHA256`)
    The same input hashed with SHA-256: what versions before 2026-11-29 stored. It is computed
    now only for a file whose SOP Instance UID is stored with a ``px1`` (the planner asks, see
    ``tasks.screening.ShardPlan``), so that the two can still be compared without decoding the
    stored file.

Why XXH3-128 and not SHA-256: a fingerprint only ever decides between two files that carry the
same SOP Instance UID, so what matters is that two different images do not collide by accident
(2^-128 per comparison), not resistance to a forger; and it is the largest cost left per image
once the pixel path is one pass: SHA-256 of the 7.4 MB of a 2000 x 1840 image takes 4.1 ms on
a CPU with SHA extensions, XXH3-128 0.4 ms (``python benchmarks/profile_decode.py``). A forger
able to write files with another instance's UID into the archive could make a different image
count as a duplicate of it (skipped, the reason naming the first file); such a writer can
equally delete the file, so nothing is lost that a cryptographic hash would have kept.

``cs1:<sha256>`` (:data:`CODESTREAM`)
    The encapsulated frame's bytes (fragments joined, trailing NUL padding removed) and the
    :func:`meaning` attributes. Used when the pixel path decoded at reduced resolution (JPEG
    2000 at 1/2^k, baseline JPEG with DCT scaling) and so never saw the full-resolution values.
    It matches the same codestream in any wrapper (another transfer syntax encoding of the data
    set, re-fragmented, implicit VR meta), but not the same pixels encoded differently: a
    native copy of a JPEG 2000 lossless file has another kind (``px2``), and a re-encoding by
    another JPEG 2000 encoder has another ``cs1``. :func:`identity.codestream_fingerprint`
    computes it on demand without decoding.

How to decide whether a stored instance and a new file with the same UID are the same image
(:func:`identity.compare` does this): equal strings are the same image. Different strings of
the same pixel kind are different images. Otherwise convert to a common kind: a stored ``px2``
(or ``px1``) against a new ``cs1`` or a pixel fingerprint of the other kind ->
:func:`identity.pixel_fingerprint` of the new file in the stored kind (one full decode, rare:
only when a UID is seen again). A stored ``cs1`` against a new file -> the new file's
:func:`identity.codestream_fingerprint` when it is encapsulated; when that differs (or it is
not encapsulated), only a full decode of *both* can tell, which needs the stored file:
:func:`identity.compare` does it when given the stored
file, and otherwise answers "unknown" (the caller should treat that as a conflict, which errs
towards keeping both and saying so).

Attributes hashed (:func:`meaning`): Rows, Columns, Bits Allocated, Bits Stored, Pixel
Representation, Photometric Interpretation (as a code: lower case reads as upper), Rescale
Slope/Intercept (absent = 1/0), Window Center/Width (every value) and VOI LUT Function (absent
= LINEAR), the Modality LUT and VOI LUT Sequences (descriptor and a hash of the data of every
item; not LUT Explanation, which is free text), Presentation LUT Shape, Pixel Padding Value and
Range Limit. Numbers are compared as numbers (``"1.0"`` and ``"1"`` in a DS are equal); an
attribute that is not a number is hashed as its text.

Cost (the 8 MB of a 2000 x 2000 16-bit image on this machine's CPU, which has SHA extensions):
XXH3-128 0.4 ms, BLAKE3 (one thread) 1.4 ms, SHA-256 4.4 ms, BLAKE2b 9.0 ms, MD5 10.5 ms.
Native little-endian pixel data is hashed in place (the decoder's array is a view of the
file's bytes; no copy). Hashing each chunk of rows inside the pixel path's one reduction pass,
while it is in cache, measured no faster (with SHA-256, 4.1 ms either way): the hash's
arithmetic is the cost, not reading the pixels.

The file's content hash (:func:`content_sha256`, the instances' ``content_sha256`` column) is
not a second pass over the pixels: for native (uncompressed, not deflated) pixel data whose
pixel fingerprint the pixel path computed, the Pixel Data value enters the hash as that
fingerprint, which already covers every stored value; every other byte of the file is hashed
as it is (with SHA-256: it is stored and compared like the file hash it replaces). Equal
content hashes mean the same bytes outside Pixel Data and the same stored values (bits above
Bits Stored, which no reader uses, are not compared). Other files (encapsulated, deflated, or
decoded at reduced resolution) are hashed byte for byte: their bytes are small beside the cost
of decoding them. This saved the 4.2 ms that a SHA-256 of a 7.4 MB file cost beside the pixel
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import xxhash
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.uid import UID

from tasks.dicom.decoders import PixelLayout
from tasks.dicom.luts import read_lut
from tasks.dicom.outcomes import InputError
from tasks.dicom.tags import label
from tasks.dicom.values import code

PIXELS = "px2"
PIXELS_SHA256 = "px1"
CODESTREAM = "cs1"
PIXEL_KINDS = (PIXELS, PIXELS_SHA256)
KINDS = (*PIXEL_KINDS, CODESTREAM)
_DIGITS = {PIXELS: 32, PIXELS_SHA256: 64, CODESTREAM: 64}  # hex digits after the prefix


def kind(fingerprint: str) -> str:
    """The kind of a fingerprint (``px2``, ``px1`` or ``cs1``); ``ValueError`` for anything
    else."""
    prefix, sep, digest = fingerprint.partition(":")
    if not sep or prefix not in KINDS or len(digest) != _DIGITS[prefix]:
        raise ValueError(f"not a content fingerprint: {fingerprint[:80]!r}")
    return prefix


def is_pixel(fingerprint: str | None) -> bool:
    """Whether ``fingerprint`` is of the full-resolution values (either pixel kind)."""
    return bool(fingerprint) and fingerprint.split(":", 1)[0] in PIXEL_KINDS


def _number(value: Any) -> Any:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return str(x)
    return x + 0.0  # -0.0 -> 0.0


def _numbers(ds: Dataset, keyword: str, default: float | None = None) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None if default is None else [default]
    if isinstance(value, MultiValue | list | tuple):
        return [_number(v) for v in value]
    return [_number(value)]


def _luts(ds: Dataset, keyword: str) -> list[Any] | None:
    seq = ds.get(keyword)
    if not seq:
        return None
    out: list[Any] = []
    for item in seq:
        try:
            first, data, bits = read_lut(item, label(keyword))
        except InputError as exc:  # an unusable LUT is hashed as its (value-free) reason
            out.append(["invalid", str(exc)])
            continue
        digest = hashlib.sha256(np.ascontiguousarray(data, dtype="<i8")).hexdigest()
        out.append([first, bits, len(data), digest])
    return out


def meaning(ds: Dataset, layout: PixelLayout, photometric: str) -> dict[str, Any]:
    """The attributes that change what the stored values mean, canonical (see the module)."""
    return {
        "rows": layout.rows,
        "columns": layout.columns,
        "bits_allocated": layout.bits_allocated,
        "bits_stored": layout.bits_stored,
        "signed": layout.signed,
        "photometric": code(photometric),
        "rescale": [_numbers(ds, "RescaleSlope", 1.0), _numbers(ds, "RescaleIntercept", 0.0)],
        "window": [_numbers(ds, "WindowCenter"), _numbers(ds, "WindowWidth")],
        "voi_function": code(ds.get("VOILUTFunction")) or "LINEAR",
        "modality_lut": _luts(ds, "ModalityLUTSequence"),
        "voi_lut": _luts(ds, "VOILUTSequence"),
        "presentation_lut_shape": code(ds.get("PresentationLUTShape")),
        "padding": [_numbers(ds, "PixelPaddingValue"), _numbers(ds, "PixelPaddingRangeLimit")],
    }


def _start(prefix: str, ds: Dataset, layout: PixelLayout, photometric: str) -> Any:
    h = xxhash.xxh3_128() if prefix == PIXELS else hashlib.sha256()
    h.update(prefix.encode() + b"\n")
    text = json.dumps(meaning(ds, layout, photometric), sort_keys=True, separators=(",", ":"))
    h.update(text.encode("utf-8", "backslashreplace") + b"\n")
    return h


def of_pixels(
    ds: Dataset, layout: PixelLayout, photometric: str, stored: np.ndarray, kind: str = PIXELS
) -> str:
    """``px2`` (or the ``kind`` given, ``px1``): the full-resolution stored values (shape Rows x
    Columns) and their meaning."""
    if kind not in PIXEL_KINDS:
        raise ValueError(f"not a pixel fingerprint kind: {kind!r}")
    if stored.shape != (layout.rows, layout.columns):
        raise ValueError(
            f"a pixel fingerprint needs the full {layout.rows} x {layout.columns} image, "
            f"not {stored.shape}"
        )
    canonical = np.ascontiguousarray(stored, dtype=layout.stored_dtype().newbyteorder("<"))
    h = _start(kind, ds, layout, photometric)
    h.update(canonical)
    return f"{kind}:{h.hexdigest()}"


def frame_bytes(ds: Dataset) -> bytes:
    """The single encapsulated frame, fragments joined, trailing NUL padding removed."""
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as exc:  # pydicom raises several types for broken encapsulation
        raise InputError(
            f"{label('PixelData')} encapsulation cannot be read: {type(exc).__name__}"
        ) from exc
    return bytes(frame).rstrip(b"\x00")


def of_codestream(ds: Dataset, layout: PixelLayout, photometric: str) -> str:
    """``cs1``: the encapsulated frame's bytes and their meaning (no decoding)."""
    h = _start(CODESTREAM, ds, layout, photometric)
    h.update(frame_bytes(ds))
    return f"{CODESTREAM}:{h.hexdigest()}"


#: Domain prefix of a content hash with the Pixel Data value replaced by its fingerprint: such a
#: hash can never equal the plain SHA-256 of some file's bytes (short of a collision).
_CONTENT_PREFIX = b"cxr-screen content hash 1: native Pixel Data as its pixel fingerprint\n"


def native_span(ds: Dataset, tsyntax: UID) -> tuple[int, int] | None:
    """Where the native Pixel Data value lies in the bytes ``ds`` was read from, as
    ``(start, end)`` offsets; None when the pixel data is encapsulated, the data set deflated
    (offsets then refer to the inflated stream), or the position is unknown."""
    if tsyntax.is_compressed or tsyntax.is_deflated or "PixelData" not in ds:
        return None
    elem = ds["PixelData"]
    start = getattr(elem, "file_tell", None)
    if start is None or elem.is_undefined_length or not isinstance(elem.value, bytes | bytearray):
        return None
    return start, start + len(elem.value)


def content_sha256(
    data: bytes | bytearray | memoryview,
    pixel_fingerprint: str | None = None,
    span: tuple[int, int] | None = None,
) -> str:
    """The file's content hash (hex): SHA-256 of ``data``, or, given the pixel fingerprint
    of the native pixel data at ``span`` (:func:`native_span`), of the bytes around that value
    with the fingerprint in its place (see the module)."""
    if span is None or not is_pixel(pixel_fingerprint):
        return hashlib.sha256(data).hexdigest()
    start, end = span
    if not 0 <= start <= end <= len(data):
        raise ValueError(f"pixel span {span} lies outside the {len(data)} bytes given")
    view = memoryview(data)
    h = hashlib.sha256(_CONTENT_PREFIX)
    h.update(start.to_bytes(8, "little"))
    h.update(view[:start])
    h.update(pixel_fingerprint.encode("ascii"))
    h.update(view[end:])
    return h.hexdigest()
