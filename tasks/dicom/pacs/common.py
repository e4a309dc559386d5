"""What DICOMweb and DIMSE sources share: errors, the study-date window, query matches,
instance URIs and the completeness ledger.

Nothing here holds patient data: matches keep UIDs, dates, modalities, body parts and counts
only (QIDO and C-FIND answers carry names and IDs; they are dropped where the answer is read).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Literal

Scheme = Literal["dicomweb", "dimse"]


class PacsError(Exception):
    """A problem that stops the whole query/retrieve (the PACS is down, refuses us, or answers
    nonsense). The text is one line that names the PACS and never holds a secret or patient
    data; the CLI prints it as it is."""


class PacsUnreachable(PacsError):
    """No connection could be made (refused, no route, DNS, TLS handshake, timeout)."""


class PacsAuthError(PacsError):
    """The PACS refused our credentials or our AE title (HTTP 401/403, association rejected)."""


class PacsProtocolError(PacsError):
    """The PACS answered something we cannot read (malformed QIDO JSON, unexpected status)."""


class InstanceFailure(Exception):
    """One instance could not be retrieved; the text (naming the PACS and the UID) becomes the
    instance's *failed* reason. ``transient`` failures are retried."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


# --- the study-date window -------------------------------------------------------------------

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True, order=True)
class StudyWindow:
    """Study dates ``first`` to ``last``, both included."""

    first: dt.date
    last: dt.date

    def __post_init__(self) -> None:
        if self.last < self.first:
            raise ValueError(
                f"study-date window ends ({self.last}) before it starts ({self.first})"
            )

    @classmethod
    def day(cls, day: dt.date) -> StudyWindow:
        return cls(day, day)

    @classmethod
    def since(cls, first: dt.date, today: dt.date) -> StudyWindow:
        return cls(first, max(first, today))

    @classmethod
    def parse(cls, text: str) -> StudyWindow:
        """``2026-11-28``, ``20261128``, ``2026-11-01..2026-11-28`` or ``20261101-20261128``."""
        t = text.strip()
        m = re.fullmatch(
            r"(\d{4}-?\d{2}-?\d{2})\s*(?:\.\.|/|(?<=\d{8})-)\s*(\d{4}-?\d{2}-?\d{2})", t
        )
        try:
            if m:
                return cls(_date(m.group(1)), _date(m.group(2)))
            return cls.day(_date(t))
        except ValueError as exc:
            raise ValueError(
                f"study date {text!r} is not a date (YYYY-MM-DD) or a range "
                f"(YYYY-MM-DD..YYYY-MM-DD): {exc}"
            ) from None

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def dicom(self) -> str:
        """The DICOM range matching value: ``20261128`` or ``20261101-20261128``."""
        a, b = self.first.strftime("%Y%m%d"), self.last.strftime("%Y%m%d")
        return a if a == b else f"{a}-{b}"

    def split(self) -> tuple[StudyWindow, StudyWindow] | None:
        """Two halves, or None for a single day."""
        if self.first == self.last:
            return None
        middle = self.first + dt.timedelta(days=(self.days - 1) // 2)
        return StudyWindow(self.first, middle), StudyWindow(middle + _DAY, self.last)

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}..{self.last}"


def _date(text: str) -> dt.date:
    digits = text.replace("-", "")
    if not re.fullmatch(r"\d{8}", digits):
        raise ValueError(f"{text!r} is not YYYY-MM-DD")
    return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))


# --- matches -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyMatch:
    study_uid: str
    study_date: str | None = None
    modalities: tuple[str, ...] = ()
    announced: int | None = None  # NumberOfStudyRelatedInstances (all series)


@dataclass(frozen=True)
class SeriesMatch:
    study_uid: str
    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    announced: int | None = None  # NumberOfSeriesRelatedInstances


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str | None = None


def source_uri(scheme: Scheme, pacs: str, ref: InstanceRef) -> str:
    """``dicomweb://main/studies/S/series/R/instances/I``: the PACS's name and the UIDs only."""
    return (
        f"{scheme}://{pacs}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}"
    )


_URI = re.compile(
    r"^(dicomweb|dimse)://([^/]+)/studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)$"
)


def parse_source_uri(uri: str) -> tuple[str, str, InstanceRef] | None:
    """(scheme, PACS name, InstanceRef) of a PACS instance URI; None for any other URI."""
    m = _URI.match(uri)
    if not m:
        return None
    return m.group(1), m.group(2), InstanceRef(m.group(3), m.group(4), m.group(5))


def body_part_wanted(value: str | None, body_parts: tuple[str, ...] | None) -> bool:
    """Series-level pre-filter on BodyPartExamined, by the selection policy's word rule
    (``CHEST_PA`` and ``PORT CHEST`` contain CHEST); a missing value is kept (the header scan
    and the selection policy decide on the instance)."""
    if not body_parts or not value or not value.strip():
        return True
    words = set(re.split(r"[^A-Z0-9]+", value.upper()))
    return bool(words & {b.upper() for b in body_parts})


# --- completeness ----------------------------------------------------------------------------


@dataclass
class SeriesCount:
    """How many instances of one series the PACS announced, listed, and how many arrived."""

    series_uid: str
    announced: int | None
    listed: int = 0
    arrived: int = 0
    failed: int = 0

    @property
    def expected(self) -> int:
        return max(self.announced or 0, self.listed)

    @property
    def complete(self) -> bool:
        return self.arrived >= self.expected


@dataclass
class StudyCompleteness:
    """Per study: the count the PACS gave against what arrived. A study is *complete* when
    every selected series delivered at least as many instances as the PACS announced
    (NumberOfSeriesRelatedInstances) and listed; otherwise *partial*: the pipeline records its
    files as such, does not aggregate the study, and the next run pulls it again."""

    pacs: str
    study_uid: str
    series: dict[str, SeriesCount] = field(default_factory=dict)
    series_filtered: int = 0  # series not retrieved: another modality or body part
    errors: list[str] = field(default_factory=list)  # why a listing failed, if one did

    @property
    def announced(self) -> int:
        return sum(s.expected for s in self.series.values())

    @property
    def arrived(self) -> int:
        return sum(s.arrived for s in self.series.values())

    @property
    def complete(self) -> bool:
        return not self.errors and all(s.complete for s in self.series.values())

    @property
    def reason(self) -> str | None:
        """Why the study is partial (for the files' outcomes), or None when it is complete."""
        if self.complete:
            return None
        if self.errors:
            return f"study partial: {self.errors[0]}"
        short = [s for s in self.series.values() if not s.complete]
        return (
            f"study partial: PACS {self.pacs!r} announced {self.announced} instance(s) in "
            f"{len(self.series)} series, {self.arrived} arrived ({len(short)} series short); "
            "it is pulled again on the next run"
        )


@dataclass(frozen=True)
class EchoResult:
    pacs: str
    method: str  # "C-ECHO" or "QIDO-RS"
    seconds: float
    detail: str = ""
