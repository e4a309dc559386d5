"""Rules for header values that more than one step applies, so that the steps never disagree.

* **Safe strings.** Every string taken from a header and kept (an ``InstanceHeader`` field, a
  ``facts`` value, a value quoted in a reason) passes :func:`safe_text`: control characters
  (C0 including NUL, DEL, C1), lone surrogates and the non-characters U+FFFE/U+FFFF are written
  as visible escapes (``\\x00``, ``\\udc80``) and the text is capped at a length, marked with
  ``…`` when cut. Both databases then accept it (PostgreSQL refuses NUL in ``text`` and in
  ``json``; an unpaired surrogate cannot be encoded as UTF-8), and no value can forge a line in
  a log or a table. Caps: :data:`CODE_CAP` (64) for code strings (CS, at most 16 characters by
  the standard) and short identifiers such as Accession Number (SH, 16), :data:`QUOTE_CAP` (64)
  for a value quoted in a reason, :data:`NOTE_CAP` (300) for a message or fact we compose.
* **What a reason may quote.** Numbers and enumerated codes (IS, DS, US, CS), through
  :func:`shown`; never free text (LO, SH, ST, LT, UT, PN: names, comments, explanations), dates
  or UIDs, which could be or hide patient data. Those are named by their tag only.
* **Code strings** (CS) are compared after :func:`code`: surrounding spaces and NULs removed,
  upper case. The standard allows only upper case; lower-case ``monochrome2`` is read as
  ``MONOCHROME2`` by the selection policy and the pixel path alike.
* **UIDs** (PS3.5 9.1): :func:`uid_problem` says why a value is not one, without quoting it:
  1-64 characters, digits and dots only, no empty component. A component with a leading zero
  (``1.2.03``) breaks the standard too but is kept (:func:`uid_has_leading_zero`; the header
  notes it): real devices wrote such UIDs, and a value of digits and dots cannot carry a name.
* **pydicom's own messages.** pydicom warns and logs (logger ``pydicom``) when it reads a value
  that breaks its VR, quoting the value: ``Invalid value for VR UI: '1.2.3.ZEBULON^...'``.
  :func:`redact` removes the value from such a message; a filter on the ``pydicom`` logger,
  installed when this module is imported, applies it to every record, and the pixel path
  applies it to the read warnings it keeps.
* **Image shape.** :func:`shape_problem`: an image with a side under :data:`MIN_SIDE` pixels or
  an aspect ratio above :data:`MAX_ASPECT_RATIO` is not a radiograph; the selection policy
  (screening and training both apply it) skips it before anything is decoded.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from tasks.dicom.tags import label

CODE_CAP = 64
QUOTE_CAP = 64
NOTE_CAP = 300

MIN_SIDE = 32
"""Smallest Rows and Columns of an image that is screened.

Chest CR/DX are 1,000-4,300 px a side. Archives downsampled for research go down to 64 px (and
the tests train models at 48 px input), so the floor is set well below those, only to refuse
what cannot be a radiograph: 1 x 1 placeholders, 1-px lines and strips, icons. The model input
(150 px) is upsampled from anything smaller, which the model tolerates but gains nothing from.
"""

MAX_ASPECT_RATIO = 4.0
"""Largest long side / short side of an image that is screened.

Detector and cassette formats are 1:1 to 1:1.3 (35 x 43 cm, 43 x 43 cm, 24 x 30 cm); 4:1 leaves
room for cropped and stitched images and still refuses 1 x 5000 and 4000 x 1 strips.
"""

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_UID_CHARS = re.compile(r"^[0-9.]+$")


def _escape(match: re.Match[str]) -> str:
    o = ord(match.group())
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def safe_text(text: str, cap: int = NOTE_CAP) -> str:
    """``text`` with control characters escaped and at most ``cap`` characters (see above)."""
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(_escape, text)
    if len(text) > cap:
        text = text[: max(0, cap - 1)] + "…"
    return text


def safe_optional(text: str | None, cap: int = CODE_CAP) -> str | None:
    """:func:`safe_text`, with None (and a string that is empty) kept as None."""
    if text is None or text == "":
        return None
    return safe_text(text, cap)


def shown(value: Any, cap: int = QUOTE_CAP) -> str:
    """A number or code for a reason: ``'CT'``, ``'1A'``; escaped, capped, quoted."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    return "'" + safe_text(str(value), cap) + "'"


def code(value: Any) -> str | None:
    """A code string (CS) for comparison: stripped of spaces and NULs, upper case; None when
    absent or empty. A multi-valued element gives its values joined by backslashes."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip(" \x00").upper()
    return text or None


def safe_json(value: Any, cap: int = NOTE_CAP) -> Any:
    """A JSON-able value (dicts, lists, strings, numbers, bools, None) made safe for both
    databases: every string (keys too) through :func:`safe_text`; a float that is NaN or
    infinite (which PostgreSQL's JSON refuses) as its name in a string."""
    if isinstance(value, str):
        return safe_text(value, cap)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {safe_text(str(k), cap): safe_json(v, cap) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_json(v, cap) for v in value]
    return safe_text(str(value), cap)


def uid_problem(text: str) -> str | None:
    """Why ``text`` (stripped) is not a UID, without quoting it; None when it is one."""
    if not text:
        return "it is empty"
    if len(text) > 64:
        return f"it is {len(text)} characters long; a UID has at most 64"
    if not _UID_CHARS.match(text):
        return "it holds characters other than digits and dots; a UID holds only those"
    if text.startswith(".") or text.endswith(".") or ".." in text:
        return "it has an empty component (a dot at an end or two dots in a row)"
    return None


def uid_has_leading_zero(text: str) -> bool:
    """Whether a component of a (valid) UID has a leading zero, e.g. ``1.2.03``."""
    return any(len(part) > 1 and part[0] == "0" for part in text.split("."))


def shape_problem(
    rows: int, columns: int, min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT_RATIO
) -> str | None:
    """Why an image of ``rows`` x ``columns`` is not a radiograph; None when its shape is one."""
    short, long = min(rows, columns), max(rows, columns)
    size = f"{label('Rows')} x {label('Columns')} {rows} x {columns}"
    if short < min_side:
        return f"{size}: a side under {min_side} px is not a radiograph"
    if long > max_aspect * short:
        return (
            f"{size}: an aspect ratio of {long / short:.1f}:1 is above {max_aspect:g}:1, "
            "not a radiograph"
        )
    return None


_PYDICOM_VALUE = (
    re.compile(
        r"(Invalid value for VR \w+): .*?(\.? Please see <[^>]*> for allowed values .*)?$",
        re.DOTALL,
    ),
    re.compile(r'Value ".*" is not valid (for elements with a VR of \w+)', re.DOTALL),
)


def redact(message: str) -> str:
    """A pydicom message with the offending value left out (see the module text)."""
    message = _PYDICOM_VALUE[0].sub(r"\1 (value not shown)", message)
    return _PYDICOM_VALUE[1].sub(r"A value is not valid \1", message)


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        cleaned = redact(text)
        if cleaned != text:
            record.msg, record.args = cleaned, ()
        return True


def _install_redaction() -> None:
    log = logging.getLogger("pydicom")
    if not any(isinstance(f, _Redact) for f in log.filters):
        log.addFilter(_Redact())


_install_redaction()
