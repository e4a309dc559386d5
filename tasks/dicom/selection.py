"""Selection policy: which instances a screening run scores, and why the others are skipped.

The policy is data (stored with each run through ``to_dict`` and identified by ``sha256``).
``select(header, policy)`` returns None for an instance to score, or the reason it is skipped,
written for the person reading the run summary.

Decisions (defaults), in the order they are checked:
- Modality CR or DX (case-insensitive).
- "For Processing" DX images (SOP Class 1.2.840.10008.5.1.4.1.1.1.1.1, or PresentationIntentType
  FOR PROCESSING) are skipped: they hold raw detector data that is not meant to be looked at,
  and the classifier was trained on display-ready images.
- Body part: BodyPartExamined is split into words (``CHEST_PA``, ``PORT CHEST`` and
  ``Chest-Abdomen`` each contain CHEST) and accepted when a word is one of ``body_parts``
  (CHEST, THORAX, TORAX, LUNG: THORAX and TORAX are what German, French, Spanish and Portuguese
  installations write). A missing or empty value is accepted (``accept_missing_body_part``),
  because many CR devices leave it out.
- View: PA and AP are screened. Laterals (LL, RL, LATERAL...), obliques and decubitus views are
  skipped. An unknown view (no ViewPosition and no fallback in ``tasks.dicom.headers`` gave one) is
  accepted by default (``accept_missing_view``): many CR files carry no ViewPosition, and
  dropping them would silently lose most of an older archive. A radiologist who prefers
  frontal-only certainty sets it to False; the run summary then lists those files as skipped.
- Single-frame only (NumberOfFrames absent or 1).
- Grayscale only: PhotometricInterpretation MONOCHROME1 or MONOCHROME2 and SamplesPerPixel 1.
  A missing PhotometricInterpretation is not a policy matter: the file is passed on, and the
  pixel path fails it with the reason. Codes are compared as ``tasks.dicom.values.code`` reads
  them (upper case: ``monochrome2`` is MONOCHROME2), which is how the pixel path reads them too.
- Shape: Rows and Columns at least ``min_side`` (32) and an aspect ratio at most
  ``max_aspect_ratio`` (4:1); a 1 x 5000 strip or a 1 x 1 placeholder is not a radiograph (the
  reasoning is in ``tasks.dicom.values``). Missing Rows/Columns are left to the pixel path.
  Both limits can be made stricter per run, not looser (the values module's are the floor).

Values quoted in a reason are escaped and capped (``values.shown``): a header cannot put a
control character or a long text into the stored reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from tasks.dicom.headers import InstanceHeader
from tasks.dicom.values import MAX_ASPECT_RATIO, MIN_SIDE, shape_problem, shown

DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLAT", "RLAT"})
_DESCRIBED_VIEWS = {
    "RLO": "an oblique view",
    "LLO": "an oblique view",
    "OBLIQUE": "an oblique view",
    "RLD": "a decubitus view",
    "LLD": "a decubitus view",
    "DECUBITUS": "a decubitus view",
}
_WORDS = re.compile(r"[^A-Z0-9]+")


@dataclass(frozen=True)
class SelectionPolicy:
    """Which instances are screened; see the module text for the reasoning behind defaults."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "TORAX", "LUNG")
    accept_missing_body_part: bool = True
    views: tuple[str, ...] = ("PA", "AP")
    accept_missing_view: bool = True
    single_frame_only: bool = True
    grayscale_only: bool = True
    presentation_only: bool = True
    min_side: int = MIN_SIDE
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    version: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.min_side, bool) or not isinstance(self.min_side, int):
            raise ValueError(f"min_side should be an integer instead of {self.min_side!r}")
        if self.min_side < MIN_SIDE:
            raise ValueError(f"min_side should be at least {MIN_SIDE} instead of {self.min_side}")
        aspect = self.max_aspect_ratio
        if isinstance(aspect, bool) or not isinstance(aspect, int | float):
            raise ValueError(f"max_aspect_ratio should be a number instead of {aspect!r}")
        if not 1.0 <= aspect <= MAX_ASPECT_RATIO:
            raise ValueError(
                f"max_aspect_ratio should be between 1 and {MAX_ASPECT_RATIO:g} instead of {aspect}"
            )
        object.__setattr__(self, "max_aspect_ratio", float(aspect))
        for name in ("modalities", "body_parts", "views"):
            values = getattr(self, name)
            if isinstance(values, str):
                raise ValueError(f"{name} should be a list of strings instead of {values!r}")
            normal = tuple(str(v).strip().upper() for v in values)
            if not normal or not all(normal):
                raise ValueError(f"{name} should list at least one non-empty value, got {values!r}")
            object.__setattr__(self, name, normal)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("modalities", "body_parts", "views"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionPolicy:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown selection policy field(s): {', '.join(unknown)}")
        d = dict(d)
        for key in ("modalities", "body_parts", "views"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


DEFAULT_POLICY = SelectionPolicy()


def select(header: InstanceHeader, policy: SelectionPolicy = DEFAULT_POLICY) -> str | None:
    """None when ``header`` is screened under ``policy``; otherwise why it is skipped."""
    for check in (_modality, _presentation, _body_part, _view, _frames, _grayscale, _shape):
        reason = check(header, policy)
        if reason is not None:
            return reason
    return None


def _modality(h: InstanceHeader, p: SelectionPolicy) -> str | None:
    wanted = ", ".join(p.modalities)
    if h.modality is None:
        return f"Modality is missing; only {wanted} are screened"
    if h.modality.upper() not in p.modalities:
        return f"Modality {shown(h.modality)} is not one of {wanted}"
    return None


def _presentation(h: InstanceHeader, p: SelectionPolicy) -> str | None:
    if not p.presentation_only:
        return None
    if h.sop_class_uid == DX_FOR_PROCESSING or (h.presentation_intent or "") == "FOR PROCESSING":
        return (
            "A 'For Processing' image (raw detector data, not for display); only "
            "'For Presentation' images are screened"
        )
    return None


def _body_part(h: InstanceHeader, p: SelectionPolicy) -> str | None:
    wanted = ", ".join(p.body_parts)
    if h.body_part_examined is None:
        if p.accept_missing_body_part:
            return None
        return f"BodyPartExamined is missing; only {wanted} are screened"
    words = set(_WORDS.split(h.body_part_examined.upper()))
    if words & set(p.body_parts):
        return None
    return f"BodyPartExamined {shown(h.body_part_examined)} is not one of {wanted}"


def _view(h: InstanceHeader, p: SelectionPolicy) -> str | None:
    wanted = ", ".join(p.views)
    view = h.view_position
    if view is None:
        if p.accept_missing_view:
            return None
        return (
            "the view is unknown (no ViewPosition, ViewCodeSequence or view named in "
            f"SeriesDescription/ProtocolName); only {wanted} are screened"
        )
    view = view.upper()
    if view in p.views:
        return None
    source = h.view_source or "ViewPosition"
    subject = (
        f"ViewPosition {shown(view)}"
        if source == "ViewPosition"
        else f"View {shown(view)} ({source})"
    )
    if view in LATERAL_VIEWS:
        return f"{subject} is a lateral view; only {wanted} are screened"
    if view in _DESCRIBED_VIEWS:
        return f"{subject} is {_DESCRIBED_VIEWS[view]}; only {wanted} are screened"
    return f"{subject} is not one of {wanted}"


def _frames(h: InstanceHeader, p: SelectionPolicy) -> str | None:
    if p.single_frame_only and h.number_of_frames != 1:
        return f"NumberOfFrames is {h.number_of_frames}; only single-frame images are screened"
    return None


def _grayscale(h: InstanceHeader, p: SelectionPolicy) -> str | None:
    if not p.grayscale_only:
        return None
    pi = h.photometric_interpretation
    if pi is not None and pi not in GRAYSCALE:
        return (
            f"PhotometricInterpretation {shown(pi)} is not grayscale; only "
            f"{', '.join(GRAYSCALE)} are screened"
        )
    if h.samples_per_pixel is not None and h.samples_per_pixel != 1:
        return (
            f"SamplesPerPixel is {h.samples_per_pixel}; only single-sample (grayscale) images "
            "are screened"
        )
    return None


def _shape(h: InstanceHeader, p: SelectionPolicy) -> str | None:
    if h.rows is None or h.columns is None:
        return None  # the pixel path says what is missing
    return shape_problem(h.rows, h.columns, p.min_side, p.max_aspect_ratio)
