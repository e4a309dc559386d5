"""Identity on demand: compare a file with a stored content fingerprint when the kinds differ.

The fingerprints themselves (``px2``/``px1`` of decoded values, ``cs1`` of a codestream) are
computed by the pixel path and defined in :mod:`tasks.dicom.fingerprint`; this module holds what
needs the pixel path to read and decode a file again (a full-resolution decode, rare: only when
a UID is seen again and the kinds differ), so that ``fingerprint`` stays below ``pixels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from tasks.dicom.decoders import PixelLayout
from tasks.dicom.fingerprint import PIXEL_KINDS, PIXELS, kind, of_codestream, of_pixels
from tasks.dicom.pixels import Source

# -- on demand (a UID seen again) ---------------------------------------------------------------


def _prepared(src: Source) -> tuple[Dataset, Any, PixelLayout, str]:
    import warnings

    from tasks.dicom import pixels
    from tasks.dicom.decoders import check_decodable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pixels.read_dataset(src)
    ds, tsyntax = pixels.transfer_syntax(ds, {})
    check_decodable(tsyntax)
    layout, photometric = pixels.check_image(ds, tsyntax, pixels.DEFAULT_MAX_PIXELS)
    return pixels.with_photometric(ds, photometric), tsyntax, layout, photometric


def pixel_fingerprint(src: Source, kind: str = PIXELS) -> str:
    """The pixel fingerprint of ``src`` (path, bytes, binary file or Dataset) of ``kind``
    (``px2``, or ``px1`` to compare with what earlier versions stored): one full-resolution
    decode, no windowing. ``InputError`` as :func:`tasks.dicom.pixels.preprocess`.

    Costs a full decode (for a 2000 px JPEG 2000 file about 10x the reduced decode the pixel
    path does); meant for the rare file whose UID was stored before with a pixel fingerprint.
    """
    import warnings

    from tasks.dicom.decoders import decode

    ds, tsyntax, layout, photometric = _prepared(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = decode(ds, tsyntax, layout)
    return of_pixels(ds, layout, photometric, decoded.array, kind)


def codestream_fingerprint(src: Source) -> str | None:
    """The ``cs1`` fingerprint of ``src`` without decoding; None when its pixel data is not
    encapsulated (a native file has no codestream to compare)."""
    ds, tsyntax, layout, photometric = _prepared(src)
    if not tsyntax.is_encapsulated:
        return None
    return of_codestream(ds, layout, photometric)


@dataclass(frozen=True)
class Comparison:
    """Whether two fingerprints are the same image: ``same`` True, False or None (unknown),
    and ``how`` it was decided (for a reason or a log; holds no values from the files)."""

    same: bool | None
    how: str


def compare(
    stored: str, new: str, *, new_source: Source | None = None, stored_source: Source | None = None
) -> Comparison:
    """Compare a stored fingerprint with a new file's, decoding only when the kinds differ.

    ``new_source`` / ``stored_source``: the files (path, bytes...), needed only to convert a
    fingerprint to the other kind (see the module text). ``InputError`` from reading a source
    propagates (the caller decides what a file that no longer reads means). A stored value
    that is not a fingerprint (the file hash earlier versions stored) gives "unknown";
    ``new`` must be a fingerprint (``ValueError`` otherwise).
    """
    if stored == new:
        return Comparison(True, "same fingerprint")
    kn = kind(new)
    try:
        ks = kind(stored)
    except ValueError:  # e.g. the sha256 of the file's bytes that earlier versions stored
        return Comparison(None, "the stored value is not a content fingerprint")
    if ks in PIXEL_KINDS and kn in PIXEL_KINDS:
        if ks == kn:
            return Comparison(False, "different pixel values")
        if new_source is not None:  # one hashed as earlier versions did: the other way
            same = pixel_fingerprint(new_source, ks) == stored
            return Comparison(same, f"the new file's {ks} fingerprint")
        if stored_source is not None:
            same = pixel_fingerprint(stored_source, kn) == new
            return Comparison(same, f"the stored file's {kn} fingerprint")
        return Comparison(None, f"a {ks} and a {kn} fingerprint, and neither file at hand")
    if ks in PIXEL_KINDS:  # the new file was decoded at reduced resolution
        if new_source is None:
            return Comparison(None, "the new file was decoded at reduced resolution")
        same = pixel_fingerprint(new_source, ks) == stored
        return Comparison(same, "full-resolution decode of the new file")
    # stored is a codestream fingerprint
    if (
        new_source is not None
        and kn in PIXEL_KINDS
        and codestream_fingerprint(new_source) == stored
    ):
        return Comparison(True, "same codestream")
    if stored_source is None:
        return Comparison(None, "the stored file (decoded at reduced resolution) is not at hand")
    stored_px = pixel_fingerprint(stored_source, kn if kn in PIXEL_KINDS else PIXELS)
    if kn in PIXEL_KINDS:
        return Comparison(stored_px == new, "full-resolution decode of the stored file")
    if new_source is None:
        return Comparison(None, "the new file was decoded at reduced resolution")
    same = stored_px == pixel_fingerprint(new_source)
    return Comparison(same, "full-resolution decode of both files")
