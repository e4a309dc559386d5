"""Decode the stored pixel values of one single-frame grayscale DICOM image.

``decode`` returns the *stored* values (after Bits Stored / Pixel Representation correction)
and records which decoder produced them. Two decoding routes exist:

* **Reduced resolution** (when the caller says how small the image may be): JPEG 2000 frames
  are decoded at 1/2^k resolution through Pillow's JPEG 2000 plugin (OpenJPEG's resolution
  levels), and baseline JPEG frames through ``Image.draft`` (libjpeg's DCT scaling). Any
  failure there falls back to full decoding; the reason is recorded.
* **Full resolution** through pydicom's decoders, trying the plugins in the order measured to
  be fastest here for each transfer syntax; when all fail, their messages are combined.

Pixel validation that does not need the pixels (sizes, bit depths, memory guard) lives in
``tasks.dicom.pixels``; this module assumes it has been done.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile, Jpeg2KImagePlugin
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tasks.dicom.outcomes import InputError
from tasks.dicom.tags import label

NATIVE_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)

# Full-resolution plugin order per transfer syntax (pydicom plugin names), fastest first as
# measured here (DESIGN.md, benchmarks/bench_decode.py). Available plugins not listed are
# tried afterwards in pydicom's own order.
PLUGIN_PREFERENCE: dict[str, tuple[str, ...]] = {
    RLELossless: ("pylibjpeg", "pydicom", "gdcm"),
    JPEGBaseline8Bit: ("pillow", "pylibjpeg", "gdcm"),
    JPEGExtended12Bit: ("pylibjpeg", "gdcm", "pillow"),
    JPEGLossless: ("gdcm", "pylibjpeg"),
    JPEGLosslessSV1: ("gdcm", "pylibjpeg"),
    JPEGLSLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
    JPEGLSNearLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
    JPEG2000Lossless: ("pylibjpeg", "gdcm", "pillow"),
    JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
    HTJ2KLossless: ("pylibjpeg",),
    HTJ2KLosslessRPCL: ("pylibjpeg",),
    HTJ2K: ("pylibjpeg",),
}


@dataclass
class Decoded:
    """Stored pixel values of one frame and how they were obtained."""

    array: np.ndarray  # (rows', cols') integer stored values, Bits Stored corrected
    decoder: str  # e.g. "native", "pylibjpeg", "gdcm", "pillow-j2k-reduce", "pillow-jpeg-draft"
    reduce_level: int = 0  # JPEG 2000 resolution level k (1/2^k), 0 when full resolution
    draft_scale: int = 1  # baseline JPEG DCT scale denominator, 1 when full resolution
    high_bits_masked: bool = False  # stray bits above Bits Stored were found and removed
    notes: dict[str, Any] = field(default_factory=dict)  # fallbacks, failed decoders


@dataclass(frozen=True)
class PixelLayout:
    """The (0028,xxxx) attributes decoding depends on, validated by the caller."""

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool


def decode(
    ds: Dataset,
    tsyntax: UID,
    layout: PixelLayout,
    *,
    min_shape: tuple[int, int] | None = None,
) -> Decoded:
    """Decode the single frame of ``ds``.

    ``min_shape`` (rows, cols): when given, a reduced-resolution decode is attempted for
    JPEG 2000 and baseline JPEG, as small as possible but at least this size.
    """
    notes: dict[str, Any] = {}
    if min_shape is not None and tsyntax.is_encapsulated:
        reduced = _decode_reduced(ds, tsyntax, layout, min_shape, notes)
        if reduced is not None:
            return reduced
    arr, plugin, failures = _decode_full(ds, tsyntax)
    if failures:
        notes["decoders_failed"] = failures
    arr, masked = correct_stored_bits(arr, layout)
    return Decoded(arr, plugin, high_bits_masked=masked, notes=notes)


def correct_stored_bits(arr: np.ndarray, layout: PixelLayout) -> tuple[np.ndarray, bool]:
    """Remove bits above Bits Stored (unsigned) or sign-extend from Bits Stored (signed).

    Returns the corrected array and whether any value actually needed correcting.
    """
    if arr.dtype.kind not in "iu":
        raise InputError(f"decoder returned {arr.dtype} pixels; integer stored values expected")
    container = arr.dtype.itemsize * 8
    bits = layout.bits_stored
    if bits >= container:
        return arr, False
    if layout.signed:
        if arr.dtype.kind == "u":
            arr = arr.view(arr.dtype.str.replace("u", "i"))
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if int(arr.min()) >= low and int(arr.max()) <= high:
            return arr, False
        shift = container - bits
        arr = np.right_shift(np.left_shift(arr, shift), shift)
        return arr, True
    if arr.dtype.kind == "i":
        arr = arr.view(arr.dtype.str.replace("i", "u"))
    limit = (1 << bits) - 1
    if int(arr.max()) <= limit:
        return arr, False
    if not arr.flags.writeable:
        arr = arr.copy()
    np.bitwise_and(arr, limit, out=arr)
    return arr, True


# -- full resolution ----------------------------------------------------------------------


def _decode_full(ds: Dataset, tsyntax: UID) -> tuple[np.ndarray, str, list[str]]:
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise InputError(
            f"{label('TransferSyntaxUID')} value '{tsyntax}' ({tsyntax.name}) is not "
            "supported: no pixel data decoder exists for it"
        ) from None
    options = {"correct_unused_bits": False}
    if decoder.is_native:
        try:
            # a read-only view of the element's bytes, not a copy (correct_stored_bits copies
            # when it has to change a value)
            arr = decoder.as_array(ds, index=0, raw=True, view_only=True, **options)[0]
        except Exception as exc:  # pydicom's messages name the problem; keep them
            raise InputError(f"reading native pixel data failed: {exc}") from exc
        return _as_2d(arr), "native", []
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise InputError(
            f"{label('TransferSyntaxUID')} value '{tsyntax}' ({tsyntax.name}) cannot be "
            f"decoded: no decoder plugin is available ({missing})"
        )
    available = decoder.available_plugins
    preferred = [p for p in PLUGIN_PREFERENCE.get(tsyntax, ()) if p in available]
    order = preferred + [p for p in available if p not in preferred]
    failures: list[str] = []
    for plugin in order:
        try:
            arr = decoder.as_array(ds, index=0, raw=True, decoding_plugin=plugin, **options)[0]
        except Exception as exc:
            failures.append(f"{plugin}: {_one_line(exc, plugin)}")
            continue
        return _as_2d(arr), plugin, failures
    raise InputError(
        f"decoding {tsyntax.name} pixel data failed with every available decoder: "
        + "; ".join(failures)
    )


def _as_2d(arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 2:
        raise InputError(f"decoder returned an array of shape {arr.shape}; one 2-D frame expected")
    return arr


_PYDICOM_WRAPPER = "Unable to decode as exceptions were raised by all available plugins:"


def _one_line(exc: BaseException, plugin: str = "") -> str:
    """The exception's message on one line, without pydicom's wrapper text, at most 300 chars."""
    text = " ".join(str(exc).split()).replace(_PYDICOM_WRAPPER, "").strip()
    if plugin and text.startswith(f"{plugin}: "):
        text = text[len(plugin) + 2 :]
    return text[:300] if text else type(exc).__name__


# -- reduced resolution --------------------------------------------------------------------


def _decode_reduced(
    ds: Dataset,
    tsyntax: UID,
    layout: PixelLayout,
    min_shape: tuple[int, int],
    notes: dict[str, Any],
) -> Decoded | None:
    if tsyntax not in J2K_SYNTAXES and tsyntax != JPEGBaseline8Bit:
        return None
    try:
        frame = frame_bytes(ds)
    except Exception as exc:
        notes["reduced_fallback"] = f"frame extraction failed: {_one_line(exc)}"
        return None
    try:
        if tsyntax in J2K_SYNTAXES:
            return _reduced_j2k(frame, layout, min_shape, notes)
        return _reduced_jpeg(frame, layout, min_shape, notes)
    except Exception as exc:  # any failure: decode at full resolution instead
        notes["reduced_fallback"] = f"{type(exc).__name__}: {_one_line(exc)}"
        return None


@dataclass(frozen=True)
class J2KHeader:
    """What the main header of a JPEG 2000 codestream says about the image."""

    offset: int  # where the codestream starts in the frame (a JP2 box may precede it)
    x0: int
    y0: int
    x1: int
    y1: int
    components: int
    precision: int
    signed: bool
    levels: int | None  # decomposition levels from COD; None when not found

    def reduced_size(self, k: int) -> tuple[int, int]:
        """(width, height) OpenJPEG produces at resolution 1/2^k (ceil on the canvas)."""
        p = 1 << k
        return (-(-self.x1 // p) - -(-self.x0 // p), -(-self.y1 // p) - -(-self.y0 // p))


def parse_j2k_header(frame: bytes) -> J2KHeader:
    """Parse the SIZ and COD marker segments of a JPEG 2000 codestream."""
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC followed by SIZ
    if start < 0:
        raise ValueError("no JPEG 2000 SOC/SIZ marker found in the frame")
    pos = start + 4
    (lsiz,) = struct.unpack_from(">H", frame, pos)
    _, x1, y1, x0, y0, _, _, _, _, csiz = struct.unpack_from(">HIIIIIIIIH", frame, pos + 2)
    ssiz = frame[pos + 38]
    levels = None
    pos += lsiz
    while pos + 4 <= len(frame):
        marker, length = struct.unpack_from(">HH", frame, pos)
        if marker == 0xFF52:  # COD: Scod, SGcod (4 bytes), then SPcod starting with levels
            levels = frame[pos + 9]
            break
        if marker == 0xFF90 or marker < 0xFF00:  # SOT: end of the main header
            break
        pos += 2 + length
    return J2KHeader(
        offset=start,
        x0=x0,
        y0=y0,
        x1=x1,
        y1=y1,
        components=csiz,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
    )


def choose_reduce_level(size: tuple[int, int], min_shape: tuple[int, int], max_level: int) -> int:
    """Largest k <= max_level whose 1/2^k image (ceil sizing) still covers ``min_shape``.

    ``size`` is (rows, cols); ``min_shape`` is (rows, cols).
    """
    rows, cols = size
    need_rows, need_cols = min_shape
    k = 0
    while k < max_level:
        p = 1 << (k + 1)
        if -(-rows // p) < need_rows or -(-cols // p) < need_cols:
            break
        k += 1
    return k


class _ExactReduceJ2K(Jpeg2KImagePlugin.Jpeg2KImageFile):
    """Pillow's JPEG 2000 image, sized the way OpenJPEG sizes a reduced decode.

    Pillow computes the reduced size with round-half-up; OpenJPEG uses ceil on the reference
    grid, so on many real sizes (e.g. 1955 rows at k=3) Pillow's buffer is one row short and
    ``load()`` fails with "broken data stream". The caller sets ``exact_size``.
    """

    exact_size: tuple[int, int]

    def load(self):  # type: ignore[override]
        if self.tile and self._reduce:
            self._size = self.exact_size
            t = self.tile[0]
            args = (t[3][0], self._reduce, self.layers, t[3][3], t[3][4])
            self.tile = [ImageFile._Tile(t[0], (0, 0, *self.size), t[2], args)]
        return ImageFile.ImageFile.load(self)


def _reduced_j2k(
    frame: bytes, layout: PixelLayout, min_shape: tuple[int, int], notes: dict[str, Any]
) -> Decoded | None:
    hdr = parse_j2k_header(frame)
    why = None
    if hdr.components != 1:
        why = f"codestream has {hdr.components} components, 1 expected"
    elif hdr.precision > 16:
        why = f"codestream precision {hdr.precision} > 16 bits is not supported by Pillow"
    elif hdr.precision != layout.bits_stored or hdr.signed != layout.signed:
        why = (
            f"codestream precision/signedness {hdr.precision}/{hdr.signed} differs from "
            f"{label('BitsStored')} {layout.bits_stored} / {label('PixelRepresentation')} "
            f"{int(layout.signed)}"
        )
    elif (hdr.x1 - hdr.x0, hdr.y1 - hdr.y0) != (layout.columns, layout.rows):
        why = (
            f"codestream size {hdr.x1 - hdr.x0}x{hdr.y1 - hdr.y0} differs from "
            f"{label('Columns')} x {label('Rows')} {layout.columns}x{layout.rows}"
        )
    if why:
        notes["reduced_fallback"] = why
        return None
    max_level = hdr.levels if hdr.levels is not None else 0
    k = choose_reduce_level((layout.rows, layout.columns), min_shape, max_level)
    if k == 0:
        notes["reduced_fallback"] = "no resolution level small enough helps (k = 0)"
        return None
    im = _ExactReduceJ2K(io.BytesIO(frame[hdr.offset :]))
    im.reduce = k
    width, height = hdr.reduced_size(k)
    im.exact_size = (width, height)
    im.load()
    raw = np.asarray(im)
    if raw.shape != (height, width):
        raise ValueError(f"reduced decode gave {raw.shape}, expected {(height, width)}")
    # Pillow adds 2^(p-1) to signed samples and scales samples up to its mode's bit depth
    container = 8 if raw.dtype == np.uint8 else 16
    arr = np.right_shift(raw, container - hdr.precision).astype(_stored_dtype(layout))
    if hdr.signed:
        arr -= 1 << (hdr.precision - 1)
    return Decoded(arr, "pillow-j2k-reduce", reduce_level=k, notes=notes)


def _reduced_jpeg(
    frame: bytes, layout: PixelLayout, min_shape: tuple[int, int], notes: dict[str, Any]
) -> Decoded | None:
    im = Image.open(io.BytesIO(frame))
    if im.format != "JPEG" or im.mode != "L" or layout.bits_stored != 8:
        notes["reduced_fallback"] = (
            f"baseline JPEG frame is {im.format} mode {im.mode}; 8-bit grayscale expected"
        )
        return None
    if im.size != (layout.columns, layout.rows):
        notes["reduced_fallback"] = (
            f"JPEG frame size {im.size[0]}x{im.size[1]} differs from {label('Columns')} "
            f"x {label('Rows')} {layout.columns}x{layout.rows}"
        )
        return None
    need_rows, need_cols = min_shape
    im.draft("L", (need_cols, need_rows))
    width = im.size[0]
    scale = next(
        (s for s in (8, 4, 2, 1) if -(-layout.columns // s) == width), layout.columns // width
    )
    if scale == 1:
        notes["reduced_fallback"] = "no DCT scale small enough helps (scale 1)"
        return None
    arr = np.asarray(im).astype(_stored_dtype(layout))
    return Decoded(arr, "pillow-jpeg-draft", draft_scale=scale, notes=notes)


def _stored_dtype(layout: PixelLayout) -> np.dtype:
    kind = "i" if layout.signed else "u"
    return np.dtype(f"{kind}{max(1, layout.bits_allocated // 8)}")


def frame_bytes(ds: Dataset) -> bytes:
    """The single encapsulated frame of ``ds`` (all fragments joined)."""
    return get_frame(ds.PixelData, 0, number_of_frames=1)
