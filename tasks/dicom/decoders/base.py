"""What a decoder backend is, what it is given and what it returns.

A :class:`Backend` decodes the single frame of a data set in one transfer syntax or more. It
declares its ``name`` (recorded as the ``decoder`` fact of every image it decodes), the
``syntaxes`` it handles, whether it is a reduced-resolution route (``reduced``), and whether it
can run here (:meth:`Backend.unavailable`: the library imports, the device exists). The
registry (``tasks.dicom.decoders.registry``) decides the order in which backends are tried.

How a backend ends its attempt, and what the caller makes of it:

* returns a :class:`Decoded`: the frame's stored values, 2-D, integer. The caller removes bits
  above Bits Stored (or sign-extends) afterwards, so a backend need not;
* raises :class:`Decline` ("not this frame": a reduced route that cannot help): the reason is
  recorded and the next backend is tried;
* raises ``InputError``: the data itself is unusable and no other backend would do better
  (e.g. a native frame that cannot be read); the file fails with that reason;
* raises anything else: this backend failed; its message is recorded and the next is tried.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID

from tasks.dicom.outcomes import InputError


@dataclass
class Decoded:
    """Stored pixel values of one frame and how they were obtained."""

    array: np.ndarray  # (rows', cols') integer stored values, Bits Stored corrected
    decoder: str  # the backend's name: "native", "pylibjpeg", "pillow-j2k-reduce", ...
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

    def stored_dtype(self) -> np.dtype:
        """The integer type of one stored value (Bits Allocated, Pixel Representation)."""
        kind = "i" if self.signed else "u"
        return np.dtype(f"{kind}{max(1, self.bits_allocated // 8)}")


@dataclass
class DecodeJob:
    """One frame to decode: the data set, its transfer syntax and validated layout.

    ``min_shape`` (rows, cols) is how small a reduced-resolution route may make the image; None
    when only full resolution is wanted.
    """

    ds: Dataset
    tsyntax: UID
    layout: PixelLayout
    min_shape: tuple[int, int] | None = None
    _frame: bytes | None = field(default=None, repr=False)

    def frame(self) -> bytes:
        """The single encapsulated frame (all fragments joined), extracted once."""
        if self._frame is None:
            self._frame = get_frame(self.ds.PixelData, 0, number_of_frames=1)
        return self._frame


class Decline(Exception):
    """A backend passes on this frame (e.g. no resolution level small enough helps)."""


class Backend(ABC):
    """One way of decoding pixel data; see the module text for the contract."""

    name: str
    syntaxes: frozenset[str]
    reduced: bool = False  # a reduced-resolution route: tried first, only when allowed

    def unavailable(self, tsyntax: UID) -> str | None:
        """None when this backend can decode ``tsyntax`` here; else what is missing.

        Called for every frame: cache what is slow to find out (an import, a device probe).
        """
        return None

    @abstractmethod
    def decode(self, job: DecodeJob) -> Decoded:
        """The stored values of ``job``'s frame (see the module text for how to fail)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


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


def as_2d(arr: np.ndarray) -> np.ndarray:
    """``arr`` when it is one 2-D frame; ``InputError`` otherwise."""
    if arr.ndim != 2:
        raise InputError(f"decoder returned an array of shape {arr.shape}; one 2-D frame expected")
    return arr


_PYDICOM_WRAPPER = "Unable to decode as exceptions were raised by all available plugins:"


def one_line(exc: BaseException, plugin: str = "") -> str:
    """The exception's message on one line, without pydicom's wrapper text, at most 300 chars."""
    text = " ".join(str(exc).split()).replace(_PYDICOM_WRAPPER, "").strip()
    if plugin and text.startswith(f"{plugin}: "):
        text = text[len(plugin) + 2 :]
    return text[:300] if text else type(exc).__name__
