"""The display table of one image, built on the host from its histogram (computed on the device).

The CPU path folds the modality LUT, the VOI (VOI LUT, window, or percentiles of the image's
values) and the MONOCHROME1 inversion into one table over the stored values
(``tasks.dicom.pixels.display_table``), after checking that the result is finite and not nearly
constant. The device path builds the very same table with the very same functions: what they
need from the pixels is only the histogram of stored values (which the device computes, one
kernel per batch) and their range. :class:`HistogramValues` gives them that histogram in place
of the pixel array, so no DICOM rule is restated here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.spec import PreprocessSpec
from tasks.dicom import pixels as px
from tasks.dicom.outcomes import InputError
from tasks.dicom.tags import label


class HistogramValues(px.StoredValues):
    """``pixels.StoredValues`` from a histogram: values ``low..high`` and their pixel counts."""

    def __init__(
        self, low: int, high: int, counts: np.ndarray, padding: tuple[int, int] | None
    ) -> None:
        if len(counts) != high - low + 1:
            raise ValueError(f"{len(counts)} counts for the values {low}..{high}")
        self.arr = None  # type: ignore[assignment]  # the pixels stay on the device
        self.padding = padding
        self.min = low
        self.max = high
        self.domain = np.arange(low, high + 1, dtype=np.int64)
        self._counts = np.asarray(counts, dtype=np.int64)
        self._index = None

    @property
    def index(self) -> np.ndarray:
        raise RuntimeError("the per-pixel index of a device image lives on the device")

    @property
    def counts(self) -> np.ndarray:
        return self._counts  # type: ignore[return-value]


def display_levels(
    header, layout, photometric: str, spec: PreprocessSpec, counts: np.ndarray, first: int
) -> tuple[np.ndarray, int, dict[str, Any], tuple[float, float] | None]:
    """(summands, low, facts, line) for an image whose stored value ``first + i`` occurs
    ``counts[i]`` times, over the image's range of stored values ``low..high``.

    ``summands[v - low]`` is what the device box-averages for stored value ``v``, as the CPU
    path's ``box_means`` does: when the display table is a straight line over the image's
    values (``pixels.display_line``: a linear window that clips nothing), ``line`` is
    (displayed value of ``low``, slope) and the summands are the stored values themselves (the
    line is applied to their box means); otherwise ``line`` is None and the summands are the
    table quantised to 16-bit levels. ``facts``: the CPU path's ``modality_lut``, ``window``
    (and ``window_rejected``), ``inverted`` (and ``inverted_by``) and ``window_linear``.

    Raises ``InputError`` (the CPU path's reasons) for a rescale or LUT that is not finite and
    for a blank or nearly constant image.
    """
    present = np.flatnonzero(counts)
    if len(present) == 0:
        raise InputError(f"{label('PixelData')} holds no pixels")
    low, high = first + int(present[0]), first + int(present[-1])
    stats = HistogramValues(
        low, high, counts[low - first : high - first + 1], px.padding_range(header, layout)
    )
    facts: dict[str, Any] = {}
    modality = px.modality_transform(header, layout)
    facts["modality_lut"] = modality.facts
    px.check_finite(modality.fn(stats.domain), px.modality_source(modality))
    voi = px.voi_transform(header, spec, modality, stats)
    facts["window"] = voi.facts
    if voi.rejected:
        facts["window_rejected"] = voi.rejected
    invert, invert_reason = px.inversion(header, photometric)
    facts["inverted"] = invert
    if invert_reason:
        facts["inverted_by"] = invert_reason
    table = px.display_table(stats, modality, voi, invert)
    line = px.display_line(table, stats)
    facts["window_linear"] = line is not None
    px.check_not_constant(table, stats, voi)
    if line is not None:
        summands = np.arange(low, high + 1, dtype=np.int32)
    else:
        summands = np.rint(table * px.DISPLAY_LEVELS).astype(np.int32)
    return summands, low, facts, line
