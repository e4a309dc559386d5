"""Named, parameterised example queries (``sql/queries/NAME.sql``) run into DataFrames.

Each file starts with a comment header: free text (the description), then one line per
parameter::

    -- Positive studies whose study date is the given day.
    -- :day date  the study date, e.g. yesterday

Parameter types: date, datetime, str, int, float. Values are always bound, never formatted into
the SQL; unknown names and unknown or missing parameters are refused with a clear error.
Dates may be given as ``datetime.date`` or ISO text; datetimes as aware ``datetime`` or ISO
text with an offset (they are compared in UTC).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

QUERIES_DIR = Path(__file__).resolve().parent / "queries"
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PARAM_LINE = re.compile(r"--\s*:(\w+)\s+(\w+)\s*(.*)")
_TYPES: dict[str, sa.types.TypeEngine] = {
    "date": sa.Date(),
    "datetime": sa.DateTime(),
    "str": sa.Text(),
    "int": sa.Integer(),
    "float": sa.Double(),
}


@dataclass(frozen=True)
class QueryParam:
    name: str
    type: str
    description: str


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    params: tuple[QueryParam, ...]
    sql: str  # the body, header comments removed


def list_queries() -> list[str]:
    """The names of the available queries (file names without ``.sql``), sorted."""
    return sorted(p.stem for p in QUERIES_DIR.glob("*.sql"))


def load_query(name: str) -> Query:
    """Parse ``sql/queries/NAME.sql``: description, declared parameters and body."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name not in list_queries():
        raise ValueError(f"unknown query {name!r}; available queries: {', '.join(list_queries())}")
    path = QUERIES_DIR / f"{name}.sql"
    lines = path.read_text().splitlines()
    description, params, body_start = [], [], len(lines)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("--"):
            body_start = i
            break
        match = _PARAM_LINE.fullmatch(stripped)
        if match:
            pname, ptype, pdesc = match.groups()
            if ptype not in _TYPES:
                raise ValueError(
                    f"{path}: parameter :{pname} has type {ptype!r}, "
                    f"which is not one of {', '.join(_TYPES)}"
                )
            params.append(QueryParam(pname, ptype, pdesc.strip()))
        else:
            description.append(stripped.lstrip("-").strip())
    body = "\n".join(lines[body_start:]).strip().rstrip(";")
    used = set(sa.text(body).compile().params)
    declared = {p.name for p in params}
    if used != declared:
        raise ValueError(
            f"{path}: the SQL uses parameters {sorted(used)} but the header declares "
            f"{sorted(declared)}"
        )
    return Query(name, " ".join(d for d in description if d), tuple(params), body)


def _convert(query: str, param: QueryParam, value: Any) -> Any:
    where = f"parameter :{param.name} ({param.type}) of query {query!r}"
    if param.type == "date":
        if isinstance(value, dt.datetime):
            raise ValueError(f"{where} must be a date, got the datetime {value!r}")
        if isinstance(value, dt.date):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
        raise ValueError(f"{where} must be a date (YYYY-MM-DD), got {value!r}")
    if param.type == "datetime":
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{where} must be an ISO datetime, got {value!r}") from None
        if not isinstance(value, dt.datetime):
            raise ValueError(f"{where} must be a datetime, got {value!r}")
        if value.tzinfo is None:
            raise ValueError(f"{where} must carry a time zone (e.g. +00:00), got {value!r}")
        # Stored timestamps are UTC; compare as naive UTC so SQLite's text compares correctly.
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    if param.type == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
    if param.type == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{where} must be text, got {value!r}")
    return value


def run_query(engine: Engine, name: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """Run the named query with bound parameters and return the rows as a DataFrame."""
    query = load_query(name)
    params = dict(params or {})
    declared = {p.name: p for p in query.params}
    unknown = sorted(set(params) - set(declared))
    missing = sorted(set(declared) - set(params))
    if unknown or missing:
        signature = ", ".join(f"{p.name} ({p.type})" for p in query.params) or "none"
        raise ValueError(
            f"query {name!r} takes parameters: {signature}; "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    values = {k: _convert(name, declared[k], v) for k, v in params.items()}
    statement = sa.text(query.sql).bindparams(
        *(sa.bindparam(p.name, type_=_TYPES[p.type]) for p in query.params)
    )
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        result = conn.execute(statement, values)
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))
