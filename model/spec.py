"""The preprocessing spec: how pixels become the tensor a checkpoint expects.

The spec is data. ``tasks.dicom.pixels`` implements it for DICOM; training and inference both call
that one implementation, and the spec's hash is stored with every prediction so that a score
can always be traced to the exact preprocessing that produced it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

WINDOW_POLICIES = ("dicom_or_percentile", "percentile")
RESIZE_METHODS = ("area",)


@dataclass(frozen=True)
class PreprocessSpec:
    """Window, resize and normalise a grayscale radiograph into a ``channels x size x size`` tensor.

    window_policy:
        ``dicom_or_percentile`` applies the file's VOI LUT or its first window centre/width when
        present and falls back to robust percentiles otherwise; ``percentile`` always uses the
        percentiles. The windowed image is scaled to [0, 1]; MONOCHROME1 is inverted after
        windowing so that, in every output, air is dark and bone is bright.
    percentiles:
        Lower and upper percentile of the (modality-LUT) values used as the window.
    resize:
        ``area``: box/area averaging (anti-aliased) to ``input_size x input_size``.
    mean, std:
        Per-channel normalisation applied to the [0, 1] image replicated to ``channels``.
    """

    input_size: int = 150
    channels: int = 3
    window_policy: str = "dicom_or_percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    resize: str = "area"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise ValueError(f"input_size should be at least 32 instead of {self.input_size}")
        if self.window_policy not in WINDOW_POLICIES:
            raise ValueError(
                f"window_policy {self.window_policy!r} is not one of {', '.join(WINDOW_POLICIES)}"
            )
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize {self.resize!r} is not one of {', '.join(RESIZE_METHODS)}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"percentiles {self.percentiles!r} must satisfy 0 <= low < high <= 100"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.channels}); "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing spec field(s): {', '.join(unknown)}")
        d = dict(d)
        for key in ("percentiles", "mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """Identifies the preprocessing; stored with each prediction."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


IMAGENET_SPEC = PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
