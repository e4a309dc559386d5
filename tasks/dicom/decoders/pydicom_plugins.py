"""Full-resolution backends through pydicom: native (uncompressed) pixel data and each of
pydicom's decoding plugins (pylibjpeg, gdcm, pillow, pyjpegls, and pydicom's own RLE decoder).

A plugin backend handles the transfer syntaxes pydicom lists it for, and is available for a
syntax when pydicom could import what the plugin needs for it (otherwise pydicom's own
"label - requires package" text says what is missing).
"""

from __future__ import annotations

import functools

import numpy as np
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tasks.dicom.decoders.base import Backend, Decoded, DecodeJob, as_2d
from tasks.dicom.outcomes import InputError

NATIVE_SYNTAXES = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    }
)

_OPTIONS = {"correct_unused_bits": False}  # the caller corrects Bits Stored itself


class Native(Backend):
    """Uncompressed pixel data, read as a view of the element's bytes (no copy)."""

    name = "native"
    syntaxes = NATIVE_SYNTAXES

    def decode(self, job: DecodeJob) -> Decoded:
        try:
            # a read-only view, not a copy (correct_stored_bits copies when it has to change
            # a value)
            arr = get_decoder(job.tsyntax).as_array(
                job.ds, index=0, raw=True, view_only=True, **_OPTIONS
            )[0]
        except Exception as exc:  # pydicom's messages name the problem; keep them
            raise InputError(f"reading native pixel data failed: {exc}") from exc
        return Decoded(as_2d(arr), self.name)


class PydicomPlugin(Backend):
    """One of pydicom's decoding plugins, by its pydicom label."""

    def __init__(self, label: str) -> None:
        self.name = label
        self.syntaxes = _plugin_syntaxes().get(label, frozenset())

    def unavailable(self, tsyntax: UID) -> str | None:
        decoder = get_decoder(tsyntax)
        if self.name in decoder.available_plugins:
            return None
        prefix = f"{self.name} - "
        return next(
            (m for m in decoder.missing_dependencies if m.startswith(prefix)),
            f"{self.name} - plugin not available",
        )

    def decode(self, job: DecodeJob) -> Decoded:
        arr: np.ndarray = get_decoder(job.tsyntax).as_array(
            job.ds, index=0, raw=True, decoding_plugin=self.name, **_OPTIONS
        )[0]
        return Decoded(as_2d(arr), self.name)


@functools.cache
def _plugin_syntaxes() -> dict[str, frozenset[str]]:
    """Plugin label -> the compressed transfer syntaxes pydicom lists it for."""
    found: dict[str, set[str]] = {}
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:  # no pixel data decoder in pydicom for this syntax
            continue
        if decoder.is_native:
            continue
        labels = list(decoder.available_plugins)
        labels += [m.split(" - ", 1)[0] for m in decoder.missing_dependencies]
        for label in labels:
            found.setdefault(label, set()).add(UID(uid))
    return {label: frozenset(uids) for label, uids in found.items()}
