"""Row contracts: the dicts the writers take, and the checks every value passes first.

``write_shard`` (``sql.shards``) takes three lists of dicts, documented by ``INSTANCE_KEYS``,
``OUTCOME_KEYS`` and ``PREDICTION_KEYS``; ``instance_rows``, ``outcome_rows`` and
``prediction_rows`` check and normalise them into table rows. A bad value is refused with a
``ValueError`` naming the file, the key and the rule. Patient identifiers are kept out: only a
keyed hash may stand in ``patient_id_hash``, and no ``patient*`` key may hide in ``facts``;
neither error echoes the refused value.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sql.schema import OUTCOMES

_SHA256 = re.compile(r"[0-9a-f]{64}")

#: One dict per file whose header was read. Required: sop_instance_uid, study_instance_uid,
#: source_uri, content_sha256 (sha256 hex of the file's bytes). ``study_date`` is a
#: ``datetime.date`` or a DICOM DA string (YYYYMMDD); ``patient_id_hash`` is a keyed hash
#: (64 hex digits) and never a raw ID. Unknown keys are rejected (catches raw PHI and typos).
INSTANCE_KEYS = {
    "sop_instance_uid": True,
    "study_instance_uid": True,
    "source_uri": True,
    "content_sha256": True,
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
#: content_sha256 (taken from the file's instance dict when absent), facts (JSON-able dict of
#: preprocessing facts), thumbnail_path.
OUTCOME_KEYS = {
    "source_uri": True,
    "outcome": True,
    "reason": False,
    "sop_instance_uid": False,
    "study_instance_uid": False,
    "content_sha256": False,
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
_INTEGER_HEADER_KEYS = (
    "rows",
    "columns",
    "bits_stored",
    "pixel_representation",
    "number_of_frames",
)


# --- one dict list into table rows ----------------------------------------------------------


def instance_rows(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the instance dicts (``INSTANCE_KEYS``) and return them as ``instances`` rows
    (every key present, dates parsed, integers checked); a source file may appear once."""
    rows, seen_uris = [], set()
    for item in instances:
        ident = str(item.get("source_uri") or item.get("sop_instance_uid"))
        _check_keys("instance", ident, item, INSTANCE_KEYS)
        if item["source_uri"] in seen_uris:
            raise ValueError(f"instance dict for {item['source_uri']} appears twice in the shard")
        seen_uris.add(item["source_uri"])
        row = {k: item.get(k) for k in INSTANCE_KEYS}
        row["content_sha256"] = check_sha256(f"content_sha256 of {ident}", row["content_sha256"])
        row["study_date"] = _study_date(ident, row["study_date"])
        row["patient_id_hash"] = _check_patient_hash(ident, row["patient_id_hash"])
        for key in _INTEGER_HEADER_KEYS:
            row[key] = check_optional_int(ident, key, row[key])
        rows.append(row)
    return rows


def outcome_rows(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the outcome dicts (``OUTCOME_KEYS``): a known outcome, a reason unless predicted,
    each source file once, ``facts`` plain JSON without patient keys."""
    rows, seen = [], set()
    for item in outcomes:
        ident = str(item.get("source_uri"))
        _check_keys("outcome", ident, item, OUTCOME_KEYS)
        if item["outcome"] not in OUTCOMES:
            raise ValueError(
                f"outcome {item['outcome']!r} of {ident} is not one of {', '.join(OUTCOMES)}"
            )
        if item["outcome"] != "predicted" and not item.get("reason"):
            raise ValueError(f"outcome {item['outcome']!r} of {ident} needs a reason")
        if item["outcome"] == "predicted" and not item.get("sop_instance_uid"):
            raise ValueError(f"outcome 'predicted' of {ident} needs its sop_instance_uid")
        if ident in seen:
            raise ValueError(f"outcome dict for {ident} appears twice in the shard")
        seen.add(ident)
        facts = item.get("facts") or {}
        if not isinstance(facts, dict):
            raise ValueError(f"facts of {ident} must be a dict, got {type(facts).__name__}")
        refuse_patient_keys(f"facts of {ident}", facts)
        content = item.get("content_sha256")
        rows.append(
            {
                "source_uri": item["source_uri"],
                "outcome": item["outcome"],
                "reason": item.get("reason") or None,
                "sop_instance_uid": item.get("sop_instance_uid") or None,
                "study_instance_uid": item.get("study_instance_uid") or None,
                "content_sha256": None
                if content is None
                else check_sha256(f"content_sha256 of {ident}", content),
                "facts": json.loads(json.dumps(facts, sort_keys=True)),  # plain JSON, stable order
                "thumbnail_path": None
                if item.get("thumbnail_path") is None
                else str(item["thumbnail_path"]),
            }
        )
    return rows


def prediction_rows(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the prediction dicts (``PREDICTION_KEYS``): probabilities in [0, 1], a bool label,
    a sha256 of the preprocessing."""
    rows = []
    for item in predictions:
        ident = str(item.get("source_uri") or item.get("sop_instance_uid"))
        _check_keys("prediction", ident, item, PREDICTION_KEYS)
        if not isinstance(item["label"], bool):
            raise ValueError(f"label of {ident} must be a bool, got {item['label']!r}")
        rows.append(
            {
                "source_uri": item["source_uri"],
                "sop_instance_uid": item["sop_instance_uid"],
                "study_instance_uid": item.get("study_instance_uid"),
                "score": check_probability(f"score of {ident}", item["score"]),
                "label": item["label"],
                "threshold": check_probability(f"threshold of {ident}", item["threshold"]),
                "preprocessing_sha256": check_sha256(
                    f"preprocessing_sha256 of {ident}", item["preprocessing_sha256"]
                ),
            }
        )
    return rows


# --- single values --------------------------------------------------------------------------


def check_sha256(what: str, value: Any) -> str:
    """``value`` when it is 64 lowercase hex digits, else a ValueError naming ``what``."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        shown = (
            f"{value!r}" if isinstance(value, str) and len(value) <= 80 else type(value).__name__
        )
        raise ValueError(f"{what} must be 64 lowercase hex digits (a sha256), got {shown}")
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
        except (TypeError, ValueError):
            as_int = None
        if as_int is None or as_int != value:
            raise ValueError(f"{key} of {ident} must be an integer, got {value!r}")
        return as_int
    return value


def refuse_patient_keys(what: str, value: Any) -> None:
    """Patient identifiers never go into free-form JSON (only keyed hashes, in their column)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if "patient" in str(key).lower():
                raise ValueError(
                    f"{what} has the key {key!r}: patient data is not stored in facts "
                    "(pass a keyed hash as the instance's patient_id_hash instead)"
                )
            refuse_patient_keys(what, inner)
    elif isinstance(value, list):
        for inner in value:
            refuse_patient_keys(what, inner)


def _check_keys(kind: str, ident: str, row: Mapping[str, Any], spec: Mapping[str, bool]) -> None:
    if not row.keys() <= spec.keys():
        unknown = sorted(set(row) - set(spec))
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
        raise ValueError(
            f"patient_id_hash of {ident} must be a keyed hash (64 lowercase hex digits); "
            f"got a value of length {length}, which looks like a raw identifier: refusing it"
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
    raise ValueError(
        f"(0008,0020) 'Study Date' value {value!r} of {ident} is not a date; "
        "it must be a datetime.date or a DICOM DA string YYYYMMDD"
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
