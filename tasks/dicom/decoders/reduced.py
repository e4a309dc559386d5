"""Reduced-resolution backends: decode only as many pixels as the caller needs.

* ``pillow-j2k-reduce``: JPEG 2000 (and HTJ2K codestreams Pillow's OpenJPEG reads) at
  resolution 1/2^k through Pillow's JPEG 2000 plugin (OpenJPEG's resolution levels), k the
  largest level whose image still covers the caller's ``min_shape``. Pillow sizes a reduced
  image differently from OpenJPEG; :class:`_ExactReduceJ2K` corrects that.
* ``pillow-jpeg-draft``: baseline JPEG through ``Image.draft`` (libjpeg's DCT scaling by
  1/2, 1/4 or 1/8).

Both decline (the caller then decodes at full resolution and records why) when the codestream
disagrees with the DICOM header, is not what they support, or no smaller size helps.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, Jpeg2KImagePlugin, features
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

from tasks.dicom.decoders.base import Backend, Decline, Decoded, DecodeJob
from tasks.dicom.tags import label

J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})


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


class PillowJ2KReduce(Backend):
    """JPEG 2000 at 1/2^k resolution through Pillow (OpenJPEG)."""

    name = "pillow-j2k-reduce"
    syntaxes = J2K_SYNTAXES
    reduced = True

    def unavailable(self, tsyntax: UID) -> str | None:
        return None if _pillow_codec("jpg_2000") else "Pillow was built without OpenJPEG"

    def decode(self, job: DecodeJob) -> Decoded:
        frame, layout = job.frame(), job.layout
        if job.min_shape is None:
            raise Decline("no reduced size was asked for")
        hdr = parse_j2k_header(frame)
        if hdr.components != 1:
            raise Decline(f"codestream has {hdr.components} components, 1 expected")
        if hdr.precision > 16:
            raise Decline(
                f"codestream precision {hdr.precision} > 16 bits is not supported by Pillow"
            )
        if hdr.precision != layout.bits_stored or hdr.signed != layout.signed:
            raise Decline(
                f"codestream precision/signedness {hdr.precision}/{hdr.signed} differs from "
                f"{label('BitsStored')} {layout.bits_stored} / {label('PixelRepresentation')} "
                f"{int(layout.signed)}"
            )
        if (hdr.x1 - hdr.x0, hdr.y1 - hdr.y0) != (layout.columns, layout.rows):
            raise Decline(
                f"codestream size {hdr.x1 - hdr.x0}x{hdr.y1 - hdr.y0} differs from "
                f"{label('Columns')} x {label('Rows')} {layout.columns}x{layout.rows}"
            )
        max_level = hdr.levels if hdr.levels is not None else 0
        k = choose_reduce_level((layout.rows, layout.columns), job.min_shape, max_level)
        if k == 0:
            raise Decline("no resolution level small enough helps (k = 0)")
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
        arr = np.right_shift(raw, container - hdr.precision).astype(layout.stored_dtype())
        if hdr.signed:
            arr -= 1 << (hdr.precision - 1)
        return Decoded(arr, self.name, reduce_level=k)


class PillowJpegDraft(Backend):
    """8-bit baseline JPEG at 1/2, 1/4 or 1/8 scale through libjpeg's DCT scaling."""

    name = "pillow-jpeg-draft"
    syntaxes = frozenset({JPEGBaseline8Bit})
    reduced = True

    def unavailable(self, tsyntax: UID) -> str | None:
        return None if _pillow_codec("jpg") else "Pillow was built without libjpeg"

    def decode(self, job: DecodeJob) -> Decoded:
        layout = job.layout
        if job.min_shape is None:
            raise Decline("no reduced size was asked for")
        im = Image.open(io.BytesIO(job.frame()))
        if im.format != "JPEG" or im.mode != "L" or layout.bits_stored != 8:
            raise Decline(
                f"baseline JPEG frame is {im.format} mode {im.mode}; 8-bit grayscale expected"
            )
        if im.size != (layout.columns, layout.rows):
            raise Decline(
                f"JPEG frame size {im.size[0]}x{im.size[1]} differs from {label('Columns')} "
                f"x {label('Rows')} {layout.columns}x{layout.rows}"
            )
        need_rows, need_cols = job.min_shape
        im.draft("L", (need_cols, need_rows))
        width = im.size[0]
        scale = next(
            (s for s in (8, 4, 2, 1) if -(-layout.columns // s) == width), layout.columns // width
        )
        if scale == 1:
            raise Decline("no DCT scale small enough helps (scale 1)")
        arr = np.asarray(im).astype(layout.stored_dtype())
        return Decoded(arr, self.name, draft_scale=scale)


@functools.cache
def _pillow_codec(codec: str) -> bool:
    return bool(features.check_codec(codec))
