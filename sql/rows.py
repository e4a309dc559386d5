"""Row contracts: the dicts the writers take, and the checks every value passes first.

``write_shard`` (``sql.shards``) takes three lists of dicts, documented by ``INSTANCE_KEYS``,
``OUTCOME_KEYS`` and ``PREDICTION_KEYS``; ``instance_rows``, ``outcome_rows`` and
``prediction_rows`` check and normalise them into table rows. A bad value is refused with a
``RowValueError`` (a ``ValueError``) naming the file, the column and the rule. Patient
identifiers are kept out: only a keyed hash may stand in ``patient_id_hash``, and no
``patient*`` key may hide in ``facts``; neither error echoes the refused value.

Every stored string is made safe for both databases here, the last line of defence after the
header reader (``clean_text``, ``clean_json``): trailing NUL padding is dropped, line breaks and
tabs become spaces, other control characters (NUL, C0, DEL, C1) and lone surrogates are
escaped as ``\\xNN`` / ``\\uNNNN``, and lengths are capped (``TEXT_LIMITS``). Keys (UIDs,
source URIs, thumbnail paths) that are too long keep a digest of the full value so that two
long keys stay distinct. In ``facts`` (JSON) the same holds for keys and strings at any depth,
NaN and infinities become the strings ``"nan"``, ``"inf"`` and ``"-inf"``, and nesting and
container sizes are capped. PostgreSQL refuses NUL in text and ``\\u0000`` or NaN in JSONB;
SQLite accepts them, so without this a file could fail on one database and not the other.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from sql.schema import OUTCOMES

_SHA256 = re.compile(r"[0-9a-f]{64}")
# A content fingerprint as the pixel path writes it: a short kind, then hex or base64 digits.
_FINGERPRINT = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._+/=-]{7,255}")
INT_MIN, INT_MAX = -(2**31), 2**31 - 1  # the integer columns (PostgreSQL ``integer``)

#: One dict per file whose header was read. Required: sop_instance_uid, study_instance_uid,
#: source_uri, content_sha256 (sha256 hex of the file's content: its bytes, with native pixel
#: data entering as its pixel fingerprint; ``tasks.dicom.fingerprint.content_sha256``).
#: ``pixel_fingerprint`` (a hash of the decoded native pixels and the attributes that give
#: them their meaning) and ``codestream_fingerprint`` (a hash of the compressed frames and
#: those attributes, when the pixels were decoded at reduced resolution) identify the
#: instance's content: a copy in another encoding has the same pixel fingerprint (see
#: ``sql.shards``). ``study_date`` is a ``datetime.date`` or a DICOM DA string (YYYYMMDD);
#: ``patient_id_hash`` is a keyed hash (64 hex digits) and never a raw ID. Unknown keys are
#: rejected (catches raw PHI and typos).
INSTANCE_KEYS = {
    "sop_instance_uid": True,
    "study_instance_uid": True,
    "source_uri": True,
    "content_sha256": True,
    "pixel_fingerprint": False,
    "codestream_fingerprint": False,
    "series_instance_uid": False,
    "modality": False,
    "body_part": False,
    "view_position": False,
    "photometric_interpretation": False,
    "rows": False,
    "columns": False,
    "bits_stored": False,
    "pixel_representation": False,
    "number_of_frames": False,
    "transfer_syntax_uid": False,
    "study_date": False,
    "accession_number": False,
    "patient_id_hash": False,
}
#: One dict per source file (every file seen ends in exactly one). Required: source_uri,
#: outcome (predicted | skipped | failed); reason is required unless predicted. Optional:
#: sop_instance_uid / study_instance_uid (None when the file failed before they were read),
#: content_sha256 and the fingerprints (taken from the file's instance dict when absent),
#: facts (JSON-able dict of preprocessing facts), thumbnail_path.
OUTCOME_KEYS = {
    "source_uri": True,
    "outcome": True,
    "reason": False,
    "sop_instance_uid": False,
    "study_instance_uid": False,
    "content_sha256": False,
    "pixel_fingerprint": False,
    "codestream_fingerprint": False,
    "facts": False,
    "thumbnail_path": False,
}
#: One dict per predicted file. Required: source_uri (the file it came from), sop_instance_uid,
#: score (positive-class probability in [0, 1]), label (bool), threshold, preprocessing_sha256.
#: study_instance_uid is taken from the stored instance when absent.
PREDICTION_KEYS = {
    "source_uri": True,
    "sop_instance_uid": True,
    "score": True,
    "label": True,
    "threshold": True,
    "preprocessing_sha256": True,
    "study_instance_uid": False,
}
#: The counts a run closes with (``sql.runs.finish_run``).
RUN_COUNT_KEYS = ("files_seen", "predicted", "skipped", "failed")
#: The keys of ``Checkpoint.metadata()`` a model needs to be registered.
MODEL_METADATA_REQUIRED = (
    "name",
    "version",
    "architecture",
    "class_names",
    "positive_class",
    "threshold",
    "input_size",
    "preprocessing",
    "preprocessing_sha256",
)
FINGERPRINT_KEYS = ("pixel_fingerprint", "codestream_fingerprint")
_INTEGER_HEADER_KEYS = (
    "rows",
    "columns",
    "bits_stored",
    "pixel_representation",
    "number_of_frames",
)
#: Keys: identify a row (or a file on disk); cut with a digest when too long.
_KEY_COLUMNS = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "source_uri")
#: Header facts stored as text.
_SHORT_COLUMNS = (
    "modality",
    "body_part",
    "view_position",
    "photometric_interpretation",
    "transfer_syntax_uid",
    "accession_number",
)
#: The most characters kept per kind of text (``clean_text``'s ``limit``).
TEXT_LIMITS = {
    "key": 1024,  # UIDs, source URIs, thumbnail paths (a digest keeps long ones distinct)
    "short": 256,  # header facts: accession number, modality, body part, ...
    "text": 2000,  # reasons and errors
    "fact": 1000,  # a string inside facts
    "fact_key": 128,  # a key inside facts
}
FACTS_MAX_DEPTH = 12  # nesting levels kept in facts; deeper values become "..."
FACTS_MAX_ITEMS = 256  # entries kept per dict or list in facts
#: The DICOM attribute behind each column a header value lands in (for reasons that name the
#: tag, never the value). ``(GGGG,EEEE) 'Name'``, as tasks.dicom.tags writes them.
COLUMN_TAGS = {
    "sop_instance_uid": "(0008,0018) 'SOP Instance UID'",
    "study_instance_uid": "(0020,000D) 'Study Instance UID'",
    "series_instance_uid": "(0020,000E) 'Series Instance UID'",
    "modality": "(0008,0060) 'Modality'",
    "body_part": "(0018,0015) 'Body Part Examined'",
    "view_position": "(0018,5101) 'View Position'",
    "photometric_interpretation": "(0028,0004) 'Photometric Interpretation'",
    "rows": "(0028,0010) 'Rows'",
    "columns": "(0028,0011) 'Columns'",
    "bits_stored": "(0028,0101) 'Bits Stored'",
    "pixel_representation": "(0028,0103) 'Pixel Representation'",
    "number_of_frames": "(0028,0008) 'Number of Frames'",
    "transfer_syntax_uid": "(0002,0010) 'Transfer Syntax UID'",
    "study_date": "(0008,0020) 'Study Date'",
    "accession_number": "(0008,0050) 'Accession Number'",
}


class RowValueError(ValueError):
    """A value the results database will not store. ``column`` (``table.column``, with the
    DICOM tag behind it) and ``rule`` say what and why, never the value; the message adds the
    file."""

    def __init__(self, message: str, *, column: str, rule: str) -> None:
        super().__init__(message)
        self.column = column
        self.rule = rule


def column_label(table: str, column: str) -> str:
    """``instances.accession_number ((0008,0050) 'Accession Number')``: a column and its tag."""
    tag = COLUMN_TAGS.get(column)
    return f"{table}.{column}" + (f" ({tag})" if tag else "")


def _refuse(ident: str, table: str, column: str, rule: str) -> RowValueError:
    label = column_label(table, column)
    return RowValueError(f"{label} of {ident} {rule}", column=label, rule=rule)


# --- one dict list into table rows ----------------------------------------------------------


def instance_rows(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the instance dicts (``INSTANCE_KEYS``) and return them as ``instances`` rows
    (every key present, text made safe, dates parsed, integers checked); a source file may
    appear once."""
    rows, seen_uris = [], set()
    for item in instances:
        ident = _ident(item.get("source_uri") or item.get("sop_instance_uid"))
        _check_keys("instance", ident, item, INSTANCE_KEYS)
        row = {k: item.get(k) for k in INSTANCE_KEYS}
        for key in _KEY_COLUMNS:
            row[key] = _text_column(ident, "instances", key, row[key], "key")
        if row["source_uri"] in seen_uris:
            raise ValueError(f"instance dict for {ident} appears twice in the shard")
        seen_uris.add(row["source_uri"])
        for key in _SHORT_COLUMNS:
            row[key] = _text_column(ident, "instances", key, row[key], "short")
        row["content_sha256"] = check_sha256(f"content_sha256 of {ident}", row["content_sha256"])
        for key in FINGERPRINT_KEYS:
            row[key] = check_fingerprint(ident, "instances", key, row[key])
        row["study_date"] = _study_date(ident, row["study_date"])
        row["patient_id_hash"] = _check_patient_hash(ident, row["patient_id_hash"])
        for key in _INTEGER_HEADER_KEYS:
            row[key] = check_column_int(ident, "instances", key, row[key])
        rows.append(row)
    return rows


def outcome_rows(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the outcome dicts (``OUTCOME_KEYS``): a known outcome, a reason unless predicted,
    each source file once, ``facts`` plain JSON without patient keys; text made safe."""
    rows, seen = [], set()
    for item in outcomes:
        ident = _ident(item.get("source_uri"))
        _check_keys("outcome", ident, item, OUTCOME_KEYS)
        if item["outcome"] not in OUTCOMES:
            raise ValueError(
                f"outcome {clean_text(str(item['outcome']), 40)!r} of {ident} is not one of "
                f"{', '.join(OUTCOMES)}"
            )
        if item["outcome"] != "predicted" and not item.get("reason"):
            raise ValueError(f"outcome {item['outcome']!r} of {ident} needs a reason")
        if item["outcome"] == "predicted" and not item.get("sop_instance_uid"):
            raise ValueError(f"outcome 'predicted' of {ident} needs its sop_instance_uid")
        uri = _text_column(ident, "file_outcomes", "source_uri", item["source_uri"], "key")
        if uri in seen:
            raise ValueError(f"outcome dict for {ident} appears twice in the shard")
        seen.add(uri)
        facts = item.get("facts") or {}
        if not isinstance(facts, dict):
            raise _refuse(ident, "file_outcomes", "facts", "must be a dict")
        refuse_patient_keys(f"facts of {ident}", facts)
        content = item.get("content_sha256")
        reason = item.get("reason") or None
        thumbnail = item.get("thumbnail_path")
        rows.append(
            {
                "source_uri": uri,
                "outcome": item["outcome"],
                "reason": None
                if reason is None
                else _text_column(ident, "file_outcomes", "reason", reason, "text"),
                "sop_instance_uid": _text_column(
                    ident, "file_outcomes", "sop_instance_uid", item.get("sop_instance_uid"), "key"
                ),
                "study_instance_uid": _text_column(
                    ident,
                    "file_outcomes",
                    "study_instance_uid",
                    item.get("study_instance_uid"),
                    "key",
                ),
                "content_sha256": None
                if content is None
                else check_sha256(f"content_sha256 of {ident}", content),
                **{
                    k: check_fingerprint(ident, "file_outcomes", k, item.get(k))
                    for k in FINGERPRINT_KEYS
                },
                "facts": clean_json(facts),  # plain JSON, safe strings, stable order
                "thumbnail_path": None
                if thumbnail is None
                else _text_column(ident, "file_outcomes", "thumbnail_path", str(thumbnail), "key"),
            }
        )
    return rows


def prediction_rows(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the prediction dicts (``PREDICTION_KEYS``): probabilities in [0, 1], a bool label,
    a sha256 of the preprocessing."""
    rows = []
    for item in predictions:
        ident = _ident(item.get("source_uri") or item.get("sop_instance_uid"))
        _check_keys("prediction", ident, item, PREDICTION_KEYS)
        if not isinstance(item["label"], bool):
            raise ValueError(f"label of {ident} must be a bool, got {item['label']!r}")
        table = "image_predictions"
        rows.append(
            {
                "source_uri": _text_column(ident, table, "source_uri", item["source_uri"], "key"),
                "sop_instance_uid": _text_column(
                    ident, table, "sop_instance_uid", item["sop_instance_uid"], "key"
                ),
                "study_instance_uid": _text_column(
                    ident, table, "study_instance_uid", item.get("study_instance_uid"), "key"
                ),
                "score": check_probability(f"score of {ident}", item["score"]),
                "label": item["label"],
                "threshold": check_probability(f"threshold of {ident}", item["threshold"]),
                "preprocessing_sha256": check_sha256(
                    f"preprocessing_sha256 of {ident}", item["preprocessing_sha256"]
                ),
            }
        )
    return rows


# --- safe text and JSON ---------------------------------------------------------------------

# Characters neither database should get: C0 controls, DEL, C1 controls, lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SPACES = {"\t": " ", "\n": " ", "\r": " ", "\x0b": " ", "\x0c": " "}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SPACES:
        return _SPACES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def clean_text(value: str, limit: int, *, key: bool = False) -> str:
    """``value`` safe to store in SQLite and PostgreSQL alike: trailing NUL padding dropped,
    tabs and line breaks as spaces, other control characters and lone surrogates escaped
    (``\\x00``, ``\\udc80``), at most ``limit`` characters. A ``key`` too long keeps its first
    characters and a digest of the whole value (two long keys stay distinct); other text is
    cut with an ellipsis."""
    text = value.rstrip("\x00")
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(_escape, text)
    if len(text) <= limit:
        return text
    if key:
        digest = hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:16]
        return f"{text[: max(0, limit - 18)]}~{digest}"
    return text[: max(0, limit - 1)] + "\u2026"


def clean_json(value: Any, depth: int = 0, *, max_items: int = FACTS_MAX_ITEMS) -> Any:
    """``value`` as plain JSON both databases store: dict keys and strings through
    ``clean_text`` (at any depth), NaN and infinities as ``"nan"``, ``"inf"``, ``"-inf"``,
    integers beyond 64 bits as text, tuples and sets as lists, other objects as their text;
    at most ``FACTS_MAX_DEPTH`` levels and ``max_items`` entries per container; dict keys
    sorted (a stable order)."""
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        value = value.item()  # a numpy scalar: its Python value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return clean_text(value, TEXT_LIMITS["fact"])
    if isinstance(value, numbers.Integral):
        number = int(value)
        return number if -(2**63) <= number < 2**63 else f"integer of {number.bit_length()} bits"
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "nan"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    if depth >= FACTS_MAX_DEPTH:
        return "..."
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key in sorted(value, key=lambda k: str(k))[:max_items]:
            out[clean_text(str(key), TEXT_LIMITS["fact_key"])] = clean_json(
                value[key], depth + 1, max_items=max_items
            )
        return dict(sorted(out.items()))
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [clean_json(v, depth + 1, max_items=max_items) for v in list(items)[:max_items]]
    if isinstance(value, bytes | bytearray):
        return clean_text(
            bytes(value[: TEXT_LIMITS["fact"]]).decode("latin-1"), TEXT_LIMITS["fact"]
        )
    return clean_text(str(value), TEXT_LIMITS["fact"])


def _text_column(ident: str, table: str, column: str, value: Any, kind: str) -> str | None:
    """A text column's value made safe (``clean_text``); numbers are written as text, other
    types are refused (a header value of the wrong VR, say)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _refuse(ident, table, column, f"must be text, got a {type(value).__name__}")
    return clean_text(str(value), TEXT_LIMITS[kind], key=kind == "key")


def _ident(value: Any) -> str:
    """A file's name for messages, made safe itself (it may be the value being refused)."""
    return clean_text(str(value), TEXT_LIMITS["key"], key=True)


# --- single values --------------------------------------------------------------------------


def fingerprint_scheme(fingerprint: str) -> str:
    """A content fingerprint's scheme: the text before its first ``:`` ('' when it has none)."""
    return fingerprint.split(":", 1)[0] if ":" in fingerprint else ""


def check_sha256(what: str, value: Any) -> str:
    """``value`` when it is 64 lowercase hex digits, else a ValueError naming ``what``."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        shown = (
            f"{clean_text(value, 80)!r}"
            if isinstance(value, str) and len(value) <= 80
            else type(value).__name__
        )
        raise ValueError(f"{what} must be 64 lowercase hex digits (a sha256), got {shown}")
    return value


def check_fingerprint(ident: str, table: str, column: str, value: Any) -> str | None:
    """None, or a content fingerprint: 8-256 characters of ``[A-Za-z0-9:._+/=-]``."""
    if value is None:
        return None
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise _refuse(
            ident, table, column, "must be a fingerprint of 8-256 letters, digits and :._+/=-"
        )
    return value


def check_probability(what: str, value: Any) -> float:
    """``value`` as a float in [0, 1], else a ValueError naming ``what``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return number


def check_optional_int(ident: str, key: str, value: Any) -> int | None:
    """None, or ``value`` as an int when it is one exactly (``2.0`` yes, ``2.5`` and bools no)."""
    if value is None or type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError, OverflowError):
            as_int = None
        if as_int is None or as_int != value:
            raise ValueError(f"{key} of {ident} must be an integer, got {value!r}")
        return as_int
    return value


def check_column_int(ident: str, table: str, column: str, value: Any) -> int | None:
    """None, or an integer an ``integer`` column holds (-2**31 .. 2**31-1)."""
    try:
        number = check_optional_int(ident, column, value)
    except ValueError:
        raise _refuse(ident, table, column, "must be an integer") from None
    if number is not None and not INT_MIN <= number <= INT_MAX:
        raise _refuse(ident, table, column, f"must be an integer from {INT_MIN} to {INT_MAX}")
    return number


def refuse_patient_keys(what: str, value: Any) -> None:
    """Patient identifiers never go into free-form JSON (only keyed hashes, in their column).

    Control characters are ignored when looking (``pat\\x00ient`` is ``patient``); the error
    names the key, never its value."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if "patient" in _UNSAFE.sub("", str(key)).lower():
                raise RowValueError(
                    f"{what} has the key {clean_text(str(key), 64)!r}: patient data is not "
                    "stored in facts (pass a keyed hash as the instance's patient_id_hash "
                    "instead)",
                    column="file_outcomes.facts",
                    rule="has a key that names patient data",
                )
            refuse_patient_keys(what, inner)
    elif isinstance(value, list | tuple):
        for inner in value:
            refuse_patient_keys(what, inner)


def _check_keys(kind: str, ident: str, row: Mapping[str, Any], spec: Mapping[str, bool]) -> None:
    if not row.keys() <= spec.keys():
        unknown = sorted(clean_text(str(k), 64) for k in set(row) - set(spec))
        raise ValueError(
            f"{kind} dict for {ident} has unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(spec)}"
        )
    missing = [k for k, required in spec.items() if required and row.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{kind} dict for {ident} lacks required key(s) {', '.join(missing)}")


def _check_patient_hash(ident: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        # Never echo the value: it may be the raw patient ID this check exists to keep out.
        length = len(value) if isinstance(value, str) else type(value).__name__
        raise RowValueError(
            f"patient_id_hash of {ident} must be a keyed hash (64 lowercase hex digits); "
            f"got a value of length {length}, which looks like a raw identifier: refusing it",
            column="instances.patient_id_hash",
            rule="must be a keyed hash (64 lowercase hex digits)",
        )
    return value


def _study_date(ident: str, value: Any) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        parsed = _parse_da(value)
        if parsed is not None:
            return parsed
    raise RowValueError(
        f"(0008,0020) 'Study Date' of {ident} is not a date; "
        "it must be a datetime.date or a DICOM DA string YYYYMMDD",
        column=column_label("instances", "study_date"),
        rule="is not a date (YYYYMMDD)",
    )


@functools.lru_cache(maxsize=4096)
def _parse_da(value: str) -> dt.date | None:
    """A DICOM DA (YYYYMMDD) or ISO (YYYY-MM-DD) date, else None."""
    text = value.strip()
    digits = text.replace("-", "") if len(text) == 10 and text[4::3] == "--" else text
    if len(digits) == 8 and digits.isascii() and digits.isdigit():
        try:
            return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            return None
    return None
