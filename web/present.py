"""Turning stored values into what the pages show: thumbnail URLs, pixel-path facts, times."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

# Thumbnails are written as <thumbnails dir>/<2 hex>/<16 hex>.jpg (tasks.ingest): the part of a
# stored path the page serves, relative to its own thumbnails directory.
THUMBNAIL_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{16}\.jpg")


def thumbnail_relpath(stored: str | None) -> str | None:
    """``ab/0123456789abcdef.jpg`` from a stored thumbnail path (absolute, or relative to the
    screening run's working directory), or None when the path does not have that shape."""
    if not stored:
        return None
    parts = PurePath(stored).parts[-2:]
    rel = "/".join(parts)
    return rel if THUMBNAIL_NAME.fullmatch(rel) else None


def thumbnail_file(root: Path, rel: str) -> Path | None:
    """The file for ``rel`` under ``root``, or None: a name of the wrong shape, a missing
    file, or a path that resolves outside ``root`` (``..``, a symbolic link) is never served."""
    if not THUMBNAIL_NAME.fullmatch(rel):
        return None
    try:
        base = root.resolve(strict=True)
        path = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def viewer_url(template: str | None, study_uid: str, accession: str | None) -> str | None:
    if not template:
        return None
    return template.format(
        study_uid=quote(study_uid, safe=""), accession=quote(accession or "", safe="")
    )


def when(value: dt.datetime | None, zone: str = "UTC") -> str:
    if value is None:
        return ""
    try:
        tz = ZoneInfo(zone)
    except Exception:
        tz = dt.UTC
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def age(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """How long ago, roughly (e.g. "3 h", "2 d")."""
    if value is None:
        return ""
    seconds = ((now or dt.datetime.now(dt.UTC)) - value).total_seconds()
    if seconds < 90:
        return "just now"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def pixel_facts(facts: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What the pixel path did to one image, as (label, text) rows."""
    facts = facts or {}
    rows: list[tuple[str, str]] = []
    decoder = facts.get("decoder")
    syntax = facts.get("transfer_syntax_name") or facts.get("transfer_syntax")
    if decoder or syntax:
        rows.append(("decoder", " · ".join(str(x) for x in (decoder, syntax) if x)))
    window = facts.get("window")
    if isinstance(window, dict):
        source = window.get("source")
        if "center" in window and "width" in window:
            text = f"center {_num(window['center'])}, width {_num(window['width'])}"
            if window.get("function"):
                text += f" ({window['function']})"
        elif "percentiles" in window:
            lo, hi = (window.get("percentiles") or [None, None])[:2]
            values = window.get("values") or []
            text = f"percentiles {_num(lo)}–{_num(hi)}"
            if len(values) == 2:
                text += f" → [{_num(values[0])}, {_num(values[1])}]"
        else:
            text = ", ".join(f"{k} {_num(v)}" for k, v in window.items() if k != "source")
        rows.append(("window", f"{source}: {text}" if source else text))
    if "inverted" in facts:
        inverted = "yes" if facts.get("inverted") else "no"
        if facts.get("inverted_by"):
            inverted += f", by {facts['inverted_by']}"
        rows.append(("inversion", inverted))
    lut = facts.get("modality_lut")
    if isinstance(lut, dict) and lut.get("source") not in (None, "none"):
        rows.append(
            (
                "modality LUT",
                f"{lut.get('source')}: slope {_num(lut.get('slope'))}, "
                f"intercept {_num(lut.get('intercept'))}",
            )
        )
    reduction = []
    level = facts.get("reduce_level") or 0
    scale = facts.get("draft_scale") or 1
    if level:
        reduction.append(f"JPEG 2000 level {level} (1/{2 ** int(level)})")
    if scale and scale != 1:
        reduction.append(f"JPEG DCT scale 1/{scale}")
    if not reduction:
        reduction.append("full resolution")
    if facts.get("reduced_fallback"):
        reduction.append(f"({facts['reduced_fallback']})")
    rows.append(("reduction", " ".join(reduction)))
    size = []
    if facts.get("rows") and facts.get("columns"):
        size.append(f"{facts['rows']} × {facts['columns']}")
    shape = facts.get("decoded_shape")
    if isinstance(shape, list) and len(shape) == 2:
        size.append(f"decoded {shape[0]} × {shape[1]}")
    if facts.get("input_size"):
        size.append(f"model input {facts['input_size']} px")
    if size:
        rows.append(("size", ", ".join(size)))
    bits = []
    if facts.get("photometric"):
        bits.append(str(facts["photometric"]))
    if facts.get("bits_stored"):
        bits.append(f"{facts['bits_stored']} of {facts.get('bits_allocated', '?')} bits")
    if facts.get("high_bits_masked"):
        bits.append("stray high bits masked")
    if bits:
        rows.append(("pixels", ", ".join(bits)))
    if facts.get("thumbnail_error"):
        rows.append(("thumbnail", str(facts["thumbnail_error"])))
    return rows
