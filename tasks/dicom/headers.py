"""Header scan: the tags a screening run needs, read without touching the pixel data.

``read_header`` parses a file with ``stop_before_pixels=True`` and ``specific_tags`` (elements
that are not wanted are skipped by seeking, and nothing is decompressed) and returns an
:class:`InstanceHeader`, or raises ``InputError`` with a reason a person can act on.
``parse_bytes`` gives the same header (or error) from a file already in memory, parsed whole
once, so that a decode worker reads and parses each file once for both the scan and the pixels.

Identifiers:
- PatientID is never kept: the record holds ``patient_id_hash`` = HMAC-SHA256(key, PatientID)
  (hex), so studies of one patient can be linked without storing who it is. The value is taken
  from the raw element (no pydicom validation warning can echo it into a log).
- AccessionNumber is an identifier too (one of HIPAA's "other unique identifying numbers"), but
  it is kept as is: reviewers need it to open the study in the RIS/PACS, and the results view
  shows it. It is never logged; tables holding it need the same access control as the results.

Files without the 128-byte preamble and ``DICM`` prefix (old ACR-NEMA style, or raw data sets
written by some gateways) are read with ``force=True`` and accepted only when the parse yields
all three instance UIDs as valid UIDs; anything else is "not a DICOM file".

Values kept are safe to store and show (``tasks.dicom.values``):
- UIDs (Study, Series and SOP Instance, SOP Class, Transfer Syntax) must be UIDs: at most 64
  characters, digits and dots, no empty component. Anything else fails the file with a reason
  that names the tag and the rule, never the value (a "UID" can hold a name, and is never used
  as a key). A component with a leading zero is noted and kept.
- Code strings (Modality, Body Part Examined, View Position, Presentation Intent Type,
  Photometric Interpretation) are read by ``values.code`` (stripped, upper case: the same
  reading as the pixel path's), Accession Number as written; each with control characters
  escaped and at most 64 characters.
- Notes and reasons quote numbers and codes only; dates, text and UIDs are named by their tag.

View (ViewPosition is often empty on CR): the first of these that gives an answer is used, and
``view_source`` records which one it was:
1. (0018,5101) ViewPosition, as written (upper case): AP, PA, LL, RL, LATERAL...
2. (0054,0220) ViewCodeSequence: the DX View codes (CID 4010, SNOMED CT or the legacy SRT
   codes) or, for other schemes, the code meaning (postero-anterior, antero-posterior,
   lateral, oblique, decubitus).
3. (0008,103E) SeriesDescription, then (0018,1030) ProtocolName: a word PA or AP, or LAT /
   LATERAL / LL / RL (lateral), when exactly one kind of view is named ("CHEST PA" -> PA;
   "PA + LAT" -> no answer).
4. (0020,0020) PatientOrientation: a row direction of A or P can only be a lateral projection
   (LATERAL); L or R means frontal, but cannot tell PA from AP, so it gives no answer.
ImageLaterality and Laterality describe the body side, not the projection, and are not used.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any, BinaryIO

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.dicom.outcomes import InputError, SkipReason
from tasks.dicom.sources import InputFile
from tasks.dicom.tags import label, labels
from tasks.dicom.values import (
    CODE_CAP,
    code,
    safe_optional,
    safe_text,
    shown,
    uid_has_leading_zero,
    uid_problem,
)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "PresentationIntentType",
    "SeriesDescription",
    "PatientID",
    "BodyPartExamined",
    "ProtocolName",
    "ViewPosition",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientOrientation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "ViewCodeSequence",
)
_REQUIRED_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# DX View (CID 4010): SNOMED CT and the legacy SNOMED-RT (SRT) codes.
_VIEW_CODES = {
    "272479007": "PA",
    "R-10214": "PA",
    "399348003": "AP",
    "R-10206": "AP",
    "399173006": "LL",
    "R-10236": "LL",
    "399198007": "RL",
    "R-10232": "RL",
    "399067008": "LATERAL",
    "R-102CD": "LATERAL",
}
_LATERAL_WORDS = {"LAT", "LATERAL", "LL", "RL", "LLAT", "RLAT"}


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What the pipeline knows about one instance before decoding it.

    Strings are as read (padding removed), except ``modality``, ``body_part_examined``,
    ``presentation_intent`` and ``photometric_interpretation`` (codes: upper case) and
    ``view_position`` (see the module text); every string is safe to store (control characters
    escaped, at most 64 characters; UIDs checked).
    ``number_of_frames`` is 1 when the tag is absent. ``notes`` lists values that were present
    but unusable and were recorded as missing (e.g. an invalid StudyDate).
    """

    source_uri: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    modality: str | None
    body_part_examined: str | None
    view_position: str | None
    view_source: str | None
    presentation_intent: str | None
    photometric_interpretation: str | None
    rows: int | None
    columns: int | None
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    samples_per_pixel: int | None
    number_of_frames: int
    study_date: date | None
    accession_number: str | None
    patient_id_hash: str | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["study_date"] = self.study_date.isoformat() if self.study_date else None
        d["notes"] = list(self.notes)
        return d


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 of ``value`` (UTF-8) under ``key``, as 64 hex characters."""
    if not key:
        raise ValueError("the HMAC key must not be empty")
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def read_header(src: InputFile, hmac_key: bytes) -> InstanceHeader:
    """Read the header of one file.

    Raises ``InputError`` (the file cannot be used; the text says why) and ``SkipReason`` for a
    DICOMDIR index under another name.
    """
    if not hmac_key:
        raise ValueError("the HMAC key must not be empty")
    if src.error is not None:
        raise InputError(src.error)
    fp = src.open()  # InputError when it cannot be opened
    with fp:
        return _read(src.uri, fp, src.size, hmac_key)


def parse_bytes(
    uri: str, data: bytes, hmac_key: bytes
) -> tuple[InstanceHeader, FileDataset | None, list[warnings.WarningMessage]]:
    """One parse of a file's bytes for both the header scan and the pixel path (a decode
    worker: ``tasks.ingest.decode_item``): the header ``read_header`` would return, with the
    same errors, the whole data set (pixels included; None when parsing it whole failed, the
    pixel path then says why), and what pydicom warned while reading it (for the pixel path's
    facts: ``tasks.dicom.pixels.Parsed``).

    A file that ends early, or that cannot be parsed whole, is scanned again by the header
    scan's own parse (which stops before the pixel data), so that where it ends decides the
    header's fate exactly as ``read_header`` decides it (rare: such files fail anyway)."""
    if not hmac_key:
        raise ValueError("the HMAC key must not be empty")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds, has_preamble, guard = _parse(io.BytesIO(data), len(data), whole=True)
        except InputError:
            return _read(uri, io.BytesIO(data), len(data), hmac_key), None, []
    if guard.short_at is not None or _short_element(ds) is not None:
        return _read(uri, io.BytesIO(data), len(data), hmac_key), ds, caught
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _header(uri, ds, has_preamble, guard, hmac_key), ds, caught
    except (InputError, SkipReason):
        raise
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or _exc_text(exc)}") from exc


def _read(uri: str, fp: BinaryIO, size: int | None, hmac_key: bytes) -> InstanceHeader:
    try:
        # pydicom warns with the offending value quoted (a UID holding a name, say); the
        # reason this module gives says what is wrong without it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds, has_preamble, guard = _parse(fp, size if size is not None else _size_of(fp))
            return _header(uri, ds, has_preamble, guard, hmac_key)
    except (InputError, SkipReason):
        raise
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror or _exc_text(exc)}") from exc


def group_by_study(headers: Iterable[InstanceHeader]) -> dict[str, list[InstanceHeader]]:
    """Instances by Study Instance UID, studies in order of first appearance and instances
    within a study ordered by Series then SOP Instance UID (duplicates are kept)."""
    studies: dict[str, list[InstanceHeader]] = {}
    for header in headers:
        studies.setdefault(header.study_instance_uid, []).append(header)
    for instances in studies.values():
        instances.sort(key=lambda h: (h.series_instance_uid, h.sop_instance_uid))
    return studies


# --- parsing -----------------------------------------------------------------------------------


class _Guard:
    """Wraps the file for pydicom: clamps reads to the file size (a corrupt length can't make
    it allocate gigabytes) and remembers where the data ended before an element did (pydicom
    skips unwanted elements by seeking, which never fails, and returns short reads quietly)."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self._fp = fp
        self._size = size
        self.short_at: int | None = None  # where the read or skip that ran out started
        self.short_by = 0
        self.short_in_skip = False  # True: skipping a value (short_at is its first byte)
        self.short_read = 0  # bytes asked for by the read that ran out (8: an element header)

    def _short(self, at: int, wanted: int, available: int, skip: bool) -> None:
        if self.short_at is None:
            self.short_at, self.short_by, self.short_in_skip = at, wanted - available, skip
            self.short_read = 0 if skip else wanted

    def read(self, n: int | None = -1) -> bytes:
        pos = self._fp.tell()
        available = max(0, self._size - pos)
        if n is None or n < 0:
            return self._fp.read(available)
        # Reading at the very end is how a data set normally ends; ending part-way through a
        # read is not. (A value that starts exactly at the end is caught by _short_element.)
        if 0 < available < n:
            self._short(pos, n, available, skip=False)
        return self._fp.read(min(n, available))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = self._fp.tell()
        target = {io.SEEK_SET: 0, io.SEEK_CUR: pos, io.SEEK_END: self._size}[whence] + offset
        if target > self._size:
            self._short(pos, target - pos, self._size - pos, skip=True)
            target = self._size
        return self._fp.seek(target)

    def tell(self) -> int:
        return self._fp.tell()

    def short_tag(self, little_endian: bool) -> int | None:
        """The tag of the element the file ends inside of, when it can be told (for messages)."""
        if self.short_at is None:
            return None
        e = "<" if little_endian else ">"
        if not self.short_in_skip and self.short_read == 8:
            # Most likely a cut element header: its tag is where the read began.
            self._fp.seek(self.short_at)
            head = self._fp.read(4)
            if len(head) < 4:
                return None
            group, elem = struct.unpack(f"{e}HH", head)
            return group << 16 | elem
        # A value being skipped or read: the element header ends where it began.
        value_offset = self.short_at
        for header_len in (12, 8):
            start = value_offset - header_len
            if start < 0:
                continue
            self._fp.seek(start)
            head = self._fp.read(header_len)
            if len(head) < header_len:
                continue
            if header_len == 12 and not (head[4:6].isalpha() and head[6:8] == b"\0\0"):
                continue
            group, elem = struct.unpack(f"{e}HH", head[:4])
            return group << 16 | elem
        return None


def _parse(fp: BinaryIO, size: int, whole: bool = False) -> tuple[FileDataset, bool, _Guard]:
    """The header's elements (``whole``: every element, pixel data included)."""
    if size == 0:
        raise InputError("the file is empty (0 bytes)")
    fp.seek(0)
    head = fp.read(132)
    fp.seek(0)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    guard = _Guard(fp, size)
    try:
        ds = pydicom.dcmread(
            guard,  # type: ignore[arg-type]
            stop_before_pixels=not whole,
            force=not has_preamble,
            specific_tags=None if whole else list(HEADER_TAGS),
        )
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InputError(_parse_failure(exc, has_preamble, guard)) from exc
    return ds, has_preamble, guard


def _parse_failure(exc: Exception, has_preamble: bool, guard: _Guard) -> str:
    if isinstance(exc, zipfile.BadZipFile):
        return f"the archive member is corrupt: {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:  # the OS, not pydicom
        return f"cannot read the file: {exc.strerror or _exc_text(exc)}"
    if not has_preamble:
        return _not_dicom(f"parsing it failed: {_exc_text(exc)}")
    if guard.short_at is not None:
        return _truncated(guard, None)
    return f"the DICOM data set cannot be parsed: {_exc_text(exc)}"


def _header(
    uri: str, ds: FileDataset, has_preamble: bool, guard: _Guard, hmac_key: bytes
) -> InstanceHeader:
    meta = ds.file_meta
    media_class = _str(meta.get("MediaStorageSOPClassUID"))
    if media_class == MEDIA_STORAGE_DIRECTORY:
        raise SkipReason(
            f"{label('MediaStorageSOPClassUID')} is {MEDIA_STORAGE_DIRECTORY} "
            "(Media Storage Directory Storage): a DICOMDIR index, not an image"
        )
    short_tag = _short_element(ds)  # before any value is converted (which drops raw lengths)
    notes: list[str] = []
    try:
        uids = {kw: _uid(ds, kw, notes if has_preamble else None) for kw in _REQUIRED_UIDS}
    except InputError as exc:
        if not has_preamble:
            raise InputError(_not_dicom(f"parsing it gives no valid UIDs ({exc})")) from exc
        raise
    missing = [kw for kw, value in uids.items() if value is None]
    if not has_preamble and missing:
        raise InputError(_not_dicom(f"parsing it gives no {labels(missing, ' or ')}"))
    if guard.short_at is not None or short_tag is not None:
        raise InputError(_truncated(guard, ds, short_tag))
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise InputError(
            f"{labels(missing)} {verb} missing or empty; the instance cannot be identified"
        )

    transfer_syntax = _checked_uid(_str(meta.get("TransferSyntaxUID")), "TransferSyntaxUID", notes)
    if transfer_syntax is None:
        implicit, little = ds.original_encoding
        if implicit is not None:
            transfer_syntax = str(
                ImplicitVRLittleEndian
                if implicit
                else ExplicitVRLittleEndian
                if little
                else ExplicitVRBigEndian
            )
            notes.append(
                f"no {label('TransferSyntaxUID')} in the file meta; "
                f"{pydicom.uid.UID(transfer_syntax).name} inferred from the data set"
            )
    sop_class = _uid(ds, "SOPClassUID", notes) or _checked_uid(
        media_class, "MediaStorageSOPClassUID", notes
    )
    view, view_source = _view(ds)
    frames = _int(ds, "NumberOfFrames")
    return InstanceHeader(
        source_uri=uri,
        study_instance_uid=uids["StudyInstanceUID"],  # type: ignore[arg-type]
        series_instance_uid=uids["SeriesInstanceUID"],  # type: ignore[arg-type]
        sop_instance_uid=uids["SOPInstanceUID"],  # type: ignore[arg-type]
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax,
        modality=_code(ds, "Modality"),
        body_part_examined=_code(ds, "BodyPartExamined"),
        view_position=safe_optional(view, CODE_CAP),
        view_source=view_source,
        presentation_intent=_code(ds, "PresentationIntentType"),
        photometric_interpretation=_code(ds, "PhotometricInterpretation"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored"),
        pixel_representation=_int(ds, "PixelRepresentation"),
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        number_of_frames=1 if frames is None else frames,
        study_date=_date(ds, "StudyDate", notes),
        accession_number=safe_optional(_text(ds, "AccessionNumber"), CODE_CAP),
        patient_id_hash=_patient_id_hash(ds, hmac_key),
        notes=tuple(safe_text(n) for n in notes),
    )


# --- values ------------------------------------------------------------------------------------


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception as exc:  # pydicom's value conversion raises several types
        raise InputError(f"A {label(keyword)} value cannot be read: {_exc_text(exc)}") from exc


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip(" \x00")
    return text or None


def _str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip(" \x00")
    return text or None


def _upper(text: str | None) -> str | None:
    return text.upper() if text is not None else None


def _code(ds: Dataset, keyword: str) -> str | None:
    """A code string as the selection policy and the pixel path read it, safe to store."""
    return safe_optional(code(_value(ds, keyword)), CODE_CAP)


def _uid(ds: Dataset, keyword: str, notes: list[str] | None) -> str | None:
    """The UID, or None when absent; ``InputError`` (naming the tag, not the value) when the
    value is not a UID. ``notes`` (None: do not note) receives a leading-zero note."""
    value = _value(ds, keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue):
        raise InputError(f"A {label(keyword)} has {len(value)} values; a UID must have one")
    return _checked_uid(str(value).strip(" \x00"), keyword, notes)


def _checked_uid(text: str | None, keyword: str, notes: list[str] | None) -> str | None:
    if not text:
        return None
    if problem := uid_problem(text):
        raise InputError(f"A {label(keyword)} value is not a valid UID: {problem}")
    if notes is not None and uid_has_leading_zero(text):
        notes.append(
            f"A {label(keyword)} value has a component with a leading zero, which the UID "
            "rules (PS3.5 9.1) forbid; used as is"
        )
    return text


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        if len(value) != 1:
            raise InputError(f"A {label(keyword)} has {len(value)} values; it must have one")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"A {label(keyword)} value of {shown(value, 40)} is invalid, it must be an integer"
        ) from exc


def _date(ds: Dataset, keyword: str, notes: list[str]) -> date | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    digits = text.replace(".", "")  # ACR-NEMA wrote YYYY.MM.DD
    try:
        return datetime.strptime(digits, "%Y%m%d").date()
    except ValueError:
        notes.append(  # the value is not quoted: a date field can hold anything
            f"A {label(keyword)} value is not a valid date (YYYYMMDD, {len(text)} characters "
            "read); recorded as missing"
        )
        return None


def _patient_id_hash(ds: Dataset, key: bytes) -> str | None:
    elem = ds.get_item(Tag("PatientID"))
    if elem is None:
        return None
    raw = elem.value
    if isinstance(raw, bytes):
        encodings = convert_encodings(ds.original_character_set)
        text = decode_bytes(raw, encodings, set())
    elif isinstance(raw, MultiValue):
        text = "\\".join(str(v) for v in raw)
    else:
        text = "" if raw is None else str(raw)
    text = text.strip(" \x00")
    return keyed_hash(key, text) if text else None


def _view(ds: Dataset) -> tuple[str | None, str | None]:
    position = _upper(_text(ds, "ViewPosition"))
    if position:
        return position, "ViewPosition"
    view = _view_from_codes(ds)
    if view:
        return view, "ViewCodeSequence"
    for keyword in ("SeriesDescription", "ProtocolName"):
        view = _view_from_words(_text(ds, keyword))
        if view:
            return view, keyword
    orientation = _value(ds, "PatientOrientation")
    if isinstance(orientation, MultiValue) and len(orientation) == 2:
        row = str(orientation[0]).strip().upper()
        if row[:1] in ("A", "P"):
            return "LATERAL", "PatientOrientation"
    return None, None


def _view_from_codes(ds: Dataset) -> str | None:
    seq = _value(ds, "ViewCodeSequence")
    if not seq:
        return None
    item = seq[0]
    code = _str(item.get("CodeValue")) or ""
    if code in _VIEW_CODES:
        return _VIEW_CODES[code]
    meaning = (_str(item.get("CodeMeaning")) or "").lower().replace(" ", "-")
    if "oblique" in meaning:
        return "OBLIQUE"
    if "decubitus" in meaning:
        return "DECUBITUS"
    if "lateral" in meaning:
        return "LATERAL"
    if "postero-anterior" in meaning or "posteroanterior" in meaning:
        return "PA"
    if "antero-posterior" in meaning or "anteroposterior" in meaning:
        return "AP"
    return None


def _view_from_words(text: str | None) -> str | None:
    if not text:
        return None
    words = set(re.split(r"[^A-Z0-9]+", text.upper()))
    found = {w for w in ("PA", "AP") if w in words}
    if words & _LATERAL_WORDS:
        found.add("LATERAL")
    return found.pop() if len(found) == 1 else None


# --- messages ----------------------------------------------------------------------------------


def _not_dicom(detail: str) -> str:
    return (
        f"not a DICOM file: there is no 'DICM' prefix at byte 128 (no DICOM preamble) and {detail}"
    )


def _short_element(ds: Dataset) -> int | None:
    """Tag of a wanted element whose value the file ends inside of."""
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset yields converted elements)
        elem = ds.get_item(tag)
        if (
            isinstance(elem, RawDataElement)
            and elem.length != 0xFFFFFFFF
            and elem.value is not None
            and len(elem.value) < elem.length
        ):
            return int(tag)
    return None


def _truncated(guard: _Guard, ds: Dataset | None, tag: int | None = None) -> str:
    if tag is None:
        little = True if ds is None else ds.original_encoding[1] is not False
        tag = guard.short_tag(little)
    if tag is not None:
        where = f" inside {label(tag)}"
    elif guard.short_at is not None:
        where = f" inside a data element that starts near byte {guard.short_at:,}"
    else:
        where = ""
    missing = f", {guard.short_by:,} bytes short" if guard.short_by else ""
    return f"the file is truncated: it ends{where} before the pixel data{missing}"


def _size_of(fp: BinaryIO) -> int:
    pos = fp.tell()
    end = fp.seek(0, io.SEEK_END)
    fp.seek(pos)
    return end


def _exc_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
