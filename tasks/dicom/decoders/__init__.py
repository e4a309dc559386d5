"""Decode the stored pixel values of one single-frame grayscale DICOM image.

``decode`` returns the *stored* values (after Bits Stored / Pixel Representation correction)
and records which backend produced them (the ``decoder`` fact). Backends, each in its module:

* ``pydicom_plugins``: ``native`` (uncompressed) and pydicom's decoding plugins
  (``pylibjpeg``, ``gdcm``, ``pillow``, ``pyjpegls``, ``pydicom``) at full resolution;
* ``reduced``: ``pillow-j2k-reduce`` (JPEG 2000 at 1/2^k) and ``pillow-jpeg-draft`` (baseline
  JPEG at 1/2-1/8), tried first when the caller allows a smaller image.

``registry`` registers them, orders them per transfer syntax (fastest measured first) and
runs them; ``base`` says what a backend is and how it fails. Pixel validation that does not
need the pixels (sizes, bit depths, memory guard) lives in ``tasks.dicom.pixels``; this
package assumes it has been done.
"""

from tasks.dicom.decoders.base import (
    Backend,
    Decline,
    Decoded,
    DecodeJob,
    PixelLayout,
    correct_stored_bits,
)
from tasks.dicom.decoders.registry import (
    PREFERENCE,
    REGISTRY,
    Registry,
    check_decodable,
    decode,
)

__all__ = [
    "PREFERENCE",
    "REGISTRY",
    "Backend",
    "Decline",
    "DecodeJob",
    "Decoded",
    "PixelLayout",
    "Registry",
    "check_decodable",
    "correct_stored_bits",
    "decode",
]
