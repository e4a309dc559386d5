"""What the pages read: SQLAlchemy Core over the SQL views, every value a bound parameter.

Only views are read (and ``web_users`` by :mod:`web.auth`), so the page works for a PostgreSQL
login granted ``cxr_reviewer``. Filter values reach the database as bound parameters only; the
statement text depends on which filters are set, never on their values.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sql.schema import DECISIONS, JSONType, UtcDateTime

# -- the views, as typed selectables ----------------------------------------------------------

WORKLIST = sa.table(
    "v_worklist",
    sa.column("study_instance_uid", sa.Text),
    sa.column("accession_number", sa.Text),
    sa.column("study_date", sa.Date),
    sa.column("model_name", sa.Text),
    sa.column("model_version", sa.Text),
    sa.column("score", sa.Double),
    sa.column("threshold", sa.Double),
    sa.column("n_images", sa.Integer),
    sa.column("model_id", sa.Integer),
    sa.column("run_id", sa.Integer),
    sa.column("predicted_at", UtcDateTime),
    sa.column("is_latest", sa.Integer),
    sa.column("review_id", sa.Integer),
    sa.column("decision", sa.Text),
    sa.column("reason", sa.Text),
    sa.column("note", sa.Text),
    sa.column("reviewer", sa.Text),
    sa.column("reviewed_at", UtcDateTime),
    sa.column("review_model_id", sa.Integer),
)
STUDY_RESULTS = sa.table(
    "v_study_results",
    sa.column("study_instance_uid", sa.Text),
    sa.column("accession_number", sa.Text),
    sa.column("study_date", sa.Date),
    sa.column("model_name", sa.Text),
    sa.column("model_version", sa.Text),
    sa.column("score", sa.Double),
    sa.column("label", sa.Boolean),
    sa.column("threshold", sa.Double),
    sa.column("n_images", sa.Integer),
    sa.column("run_id", sa.Integer),
    sa.column("predicted_at", UtcDateTime),
    sa.column("aggregation", sa.Text),
    sa.column("model_id", sa.Integer),
)
OUTCOMES = sa.table(
    "v_instance_outcomes",
    sa.column("source_uri", sa.Text),
    sa.column("sop_instance_uid", sa.Text),
    sa.column("study_instance_uid", sa.Text),
    sa.column("outcome", sa.Text),
    sa.column("reason", sa.Text),
    sa.column("score", sa.Double),
    sa.column("model_version", sa.Text),
    sa.column("run_id", sa.Integer),
    sa.column("model_name", sa.Text),
    sa.column("model_id", sa.Integer),
    sa.column("label", sa.Boolean),
    sa.column("thumbnail_path", sa.Text),
    sa.column("updated_at", UtcDateTime),
    sa.column("facts", JSONType),
    sa.column("view_position", sa.Text),
    sa.column("modality", sa.Text),
)
REVIEWS = sa.table(
    "v_reviews",
    sa.column("review_id", sa.Integer),
    sa.column("study_instance_uid", sa.Text),
    sa.column("decision", sa.Text),
    sa.column("reviewer", sa.Text),
    sa.column("note", sa.Text),
    sa.column("created_at", UtcDateTime),
    sa.column("model_id", sa.Integer),
    sa.column("model_name", sa.Text),
    sa.column("model_version", sa.Text),
    sa.column("reason", sa.Text),
)
RUNS = sa.table(
    "v_run_summary",
    sa.column("model_id", sa.Integer),
    sa.column("model_name", sa.Text),
    sa.column("model_version", sa.Text),
)

# Why a reviewer disagreed with a flag: a short list (stored as the key).
DISAGREE_REASONS: dict[str, str] = {
    "no_finding": "No abnormality seen",
    "artefact": "Artefact, device or positioning",
    "not_actionable": "Finding known or not actionable",
    "wrong_image": "Not a chest radiograph / wrong view",
    "poor_quality": "Image quality too poor to judge",
    "other": "Other (see note)",
}
NOTE_MAX = 2000
REVIEWED_CHOICES = ("no", "yes", "any")
MAX_PAGE = 500

_CURSOR = re.compile(r"([0-9.eE+-]{1,32})~([0-9.]{1,64})~([0-9]{1,10})")
_UID = re.compile(r"[0-9.]{1,64}")


class FilterError(ValueError):
    """A filter value the worklist cannot use; the message names the parameter and rule."""


# -- filters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """A position in the worklist order (score descending, then UID, then model id)."""

    score: float
    study_uid: str
    model_id: int

    def token(self) -> str:
        return f"{self.score!r}~{self.study_uid}~{self.model_id}"

    @classmethod
    def parse(cls, name: str, text: str) -> Cursor:
        match = _CURSOR.fullmatch(text)
        if not match:
            raise FilterError(f"{name}: not a worklist position (score~study UID~model id)")
        try:
            score = float(match[1])
        except ValueError:
            raise FilterError(f"{name}: the score part is not a number") from None
        if not 0.0 <= score <= 1.0:
            raise FilterError(f"{name}: the score part must lie in [0, 1]")
        return cls(score, match[2], int(match[3]))


@dataclass(frozen=True)
class Filters:
    """The worklist's filters, parsed and checked (never SQL text)."""

    date_from: dt.date | None = None
    date_to: dt.date | None = None
    model: str = "latest"  # "latest" (each study's newest prediction), "all", or a model id
    reviewed: str = "no"
    decision: str | None = None
    size: int = 50
    default_size: int = field(default=50, compare=False)

    @classmethod
    def parse(cls, params: Any, default_size: int = 50) -> Filters:
        """From query parameters (a mapping of str to str); raises FilterError."""

        def get(name: str) -> str:
            value = params.get(name) or ""
            if len(value) > 100:
                raise FilterError(f"{name}: longer than 100 characters")
            return value.strip()

        def date(name: str) -> dt.date | None:
            text = get(name)
            if not text:
                return None
            try:
                return dt.date.fromisoformat(text)
            except ValueError:
                raise FilterError(f"{name}: not a date (YYYY-MM-DD)") from None

        model = get("model") or "latest"
        if model not in ("latest", "all") and not model.isdigit():
            raise FilterError("model: must be 'latest', 'all' or a model id")
        reviewed = get("reviewed") or "no"
        if reviewed not in REVIEWED_CHOICES:
            raise FilterError(f"reviewed: must be one of {', '.join(REVIEWED_CHOICES)}")
        decision = get("decision") or None
        if decision is not None and decision not in DECISIONS:
            raise FilterError(f"decision: must be one of {', '.join(DECISIONS)}")
        if decision is not None:
            reviewed = "yes"
        size_text = get("size")
        if size_text and not size_text.isdigit():
            raise FilterError("size: must be a whole number")
        size = int(size_text) if size_text else default_size
        if not 1 <= size <= MAX_PAGE:
            raise FilterError(f"size: must lie between 1 and {MAX_PAGE}")
        out = cls(date("from"), date("to"), model, reviewed, decision, size, default_size)
        if out.date_from and out.date_to and out.date_from > out.date_to:
            raise FilterError("from: the range starts after it ends")
        return out

    def query(self, **extra: Any) -> str:
        """These filters as a query string (defaults left out), plus ``extra``."""
        items: dict[str, Any] = {}
        if self.date_from:
            items["from"] = self.date_from.isoformat()
        if self.date_to:
            items["to"] = self.date_to.isoformat()
        if self.model != "latest":
            items["model"] = self.model
        if self.reviewed != "no" and self.decision is None:
            items["reviewed"] = self.reviewed
        if self.decision:
            items["decision"] = self.decision
        if self.size != self.default_size:
            items["size"] = self.size
        items.update({k: v for k, v in extra.items() if v not in (None, "")})
        return urlencode(items)

    def _scope(self) -> list[sa.ColumnElement[bool]]:
        """Conditions of the date and model filters (what the counts cover)."""
        w = WORKLIST.c
        where: list[sa.ColumnElement[bool]] = []
        if self.model == "latest":
            where.append(w.is_latest == 1)
        elif self.model != "all":
            where.append(w.model_id == sa.bindparam("model_id", int(self.model), sa.Integer))
        if self.date_from:
            where.append(w.study_date >= sa.bindparam("date_from", self.date_from, sa.Date))
        if self.date_to:
            where.append(w.study_date <= sa.bindparam("date_to", self.date_to, sa.Date))
        return where

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        w = WORKLIST.c
        where = self._scope()
        if self.reviewed == "no":
            where.append(w.review_id.is_(None))
        elif self.reviewed == "yes":
            where.append(w.review_id.is_not(None))
        if self.decision:
            where.append(w.decision == sa.bindparam("decision", self.decision, sa.Text))
        return where


# -- worklist ----------------------------------------------------------------------------------


def _order(descending: bool = True) -> list[sa.ColumnElement[Any]]:
    w = WORKLIST.c
    if descending:
        return [w.score.desc(), w.study_instance_uid.asc(), w.model_id.asc()]
    return [w.score.asc(), w.study_instance_uid.desc(), w.model_id.desc()]


def _after(cursor: Cursor) -> sa.ColumnElement[bool]:
    """Rows after ``cursor`` in the worklist order."""
    w = WORKLIST.c
    s = sa.bindparam("cursor_score", cursor.score, sa.Double)
    u = sa.bindparam("cursor_uid", cursor.study_uid, sa.Text)
    m = sa.bindparam("cursor_model", cursor.model_id, sa.Integer)
    # The first condition is implied by the second; it lets the planner start its index walk
    # at the cursor instead of at the top.
    return sa.and_(
        w.score <= s,
        sa.or_(
            w.score < s,
            sa.and_(
                w.score == s,
                sa.or_(
                    w.study_instance_uid > u, sa.and_(w.study_instance_uid == u, w.model_id > m)
                ),
            ),
        ),
    )


def _before(cursor: Cursor) -> sa.ColumnElement[bool]:
    w = WORKLIST.c
    s = sa.bindparam("cursor_score", cursor.score, sa.Double)
    u = sa.bindparam("cursor_uid", cursor.study_uid, sa.Text)
    m = sa.bindparam("cursor_model", cursor.model_id, sa.Integer)
    return sa.and_(
        w.score >= s,
        sa.or_(
            w.score > s,
            sa.and_(
                w.score == s,
                sa.or_(
                    w.study_instance_uid < u, sa.and_(w.study_instance_uid == u, w.model_id < m)
                ),
            ),
        ),
    )


def cursor_of(row: dict[str, Any]) -> Cursor:
    return Cursor(float(row["score"]), row["study_instance_uid"], int(row["model_id"]))


@dataclass
class Page:
    rows: list[dict[str, Any]]
    has_next: bool
    has_prev: bool
    next_cursor: Cursor | None = None
    prev_cursor: Cursor | None = None


def worklist_page(
    conn: Connection,
    filters: Filters,
    *,
    after: Cursor | None = None,
    before: Cursor | None = None,
) -> Page:
    """One page of the worklist: ``filters.size`` rows after ``after`` (or before ``before``),
    in score order; one extra row is read to know whether another page follows."""
    where = filters.conditions()
    if before is not None:
        where.append(_before(before))
        stmt = sa.select(WORKLIST).where(*where).order_by(*_order(False))
        rows = [dict(r._mapping) for r in conn.execute(stmt.limit(filters.size + 1))]
        more = len(rows) > filters.size
        rows = rows[: filters.size][::-1]
        page = Page(rows, has_next=True, has_prev=more)
    else:
        if after is not None:
            where.append(_after(after))
        stmt = sa.select(WORKLIST).where(*where).order_by(*_order())
        rows = [dict(r._mapping) for r in conn.execute(stmt.limit(filters.size + 1))]
        more = len(rows) > filters.size
        rows = rows[: filters.size]
        page = Page(rows, has_next=more, has_prev=after is not None)
    if rows:
        page.next_cursor = cursor_of(rows[-1])
        page.prev_cursor = cursor_of(rows[0])
    return page


def worklist_rows(conn: Connection, filters: Filters, chunk: int = 2000) -> Iterator[dict]:
    """Every row the filters match, in worklist order (for the CSV export), read by keyset
    in chunks so that memory stays bounded."""
    cursor = None
    while True:
        where = filters.conditions()
        if cursor is not None:
            where.append(_after(cursor))
        stmt = sa.select(WORKLIST).where(*where).order_by(*_order()).limit(chunk)
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
        yield from rows
        if len(rows) < chunk:
            return
        cursor = cursor_of(rows[-1])


@dataclass
class Counts:
    total: int = 0
    unreviewed: int = 0
    agree: int = 0
    disagree: int = 0
    uncertain: int = 0

    @property
    def reviewed(self) -> int:
        return self.agree + self.disagree + self.uncertain

    def matching(self, filters: Filters) -> int:
        if filters.decision:
            return getattr(self, filters.decision)
        return {"no": self.unreviewed, "yes": self.reviewed, "any": self.total}[filters.reviewed]


def worklist_counts(conn: Connection, filters: Filters) -> Counts:
    """Flagged studies in the date and model scope, by review state (one aggregate query)."""
    w = WORKLIST.c

    def n(cond: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
        return sa.func.coalesce(sa.func.sum(sa.case((cond, 1), else_=0)), 0)

    stmt = sa.select(
        sa.func.count(),
        n(w.review_id.is_(None)),
        n(w.decision == "agree"),
        n(w.decision == "disagree"),
        n(w.decision == "uncertain"),
    ).where(*filters._scope())
    total, unreviewed, agree, disagree, uncertain = conn.execute(stmt).one()
    return Counts(int(total), int(unreviewed), int(agree), int(disagree), int(uncertain))


class CountsCache:
    """Worklist counts per filter scope, kept for ``ttl_s`` seconds.

    Counting reads every flagged prediction in the scope (~0.1-0.3 s at 100,000 studies), where
    a page of rows reads one page: the page shows its rows at once and its counts a moment
    later, from here. ``clear()`` after this process records a review; another process's
    reviews show within ``ttl_s``.
    """

    def __init__(self, ttl_s: float = 20.0) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[tuple, tuple[float, Counts]] = {}
        self._lock = threading.Lock()

    def get(self, conn: Connection, filters: Filters) -> Counts:
        key = (filters.date_from, filters.date_to, filters.model)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(key)
        if hit and now - hit[0] < self.ttl_s:
            return hit[1]
        counts = worklist_counts(conn, filters)
        with self._lock:
            if len(self._entries) > 256:
                self._entries.clear()
            self._entries[key] = (now, counts)
        return counts

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def neighbour(
    conn: Connection, filters: Filters, cursor: Cursor, *, forward: bool = True
) -> dict[str, Any] | None:
    """The worklist row just after (or before) ``cursor`` under ``filters``."""
    where = [*filters.conditions(), _after(cursor) if forward else _before(cursor)]
    stmt = sa.select(WORKLIST).where(*where).order_by(*_order(forward)).limit(1)
    row = conn.execute(stmt).first()
    return dict(row._mapping) if row else None


def models(conn: Connection) -> list[dict[str, Any]]:
    """Model versions that have run (for the filter menu), newest id first."""
    r = RUNS.c
    stmt = (
        sa.select(r.model_id, r.model_name, r.model_version)
        .where(r.model_id.is_not(None))
        .distinct()
        .order_by(r.model_id.desc())
    )
    return [dict(row._mapping) for row in conn.execute(stmt)]


# -- one study ---------------------------------------------------------------------------------


@dataclass
class Study:
    uid: str
    prediction: dict[str, Any]  # the shown model version's study prediction
    predictions: list[dict[str, Any]]  # every model version's, newest first
    images: list[dict[str, Any]]  # predicted files of the shown version, highest score first
    not_scored: list[dict[str, Any]]  # skipped and failed files of the study (shown version)
    history: list[dict[str, Any]]  # every review, oldest first
    worklist_row: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latest_review(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None


def valid_uid(uid: str) -> bool:
    return bool(_UID.fullmatch(uid))


def study(conn: Connection, uid: str, model_id: int | None) -> Study | None:
    """A study's predictions, images, unscored files and review history; None if unknown."""
    s = STUDY_RESULTS.c
    preds = [
        dict(r._mapping)
        for r in conn.execute(
            sa.select(STUDY_RESULTS)
            .where(s.study_instance_uid == sa.bindparam("uid", uid, sa.Text))
            .order_by(s.predicted_at.desc(), s.model_id.desc())
        )
    ]
    if not preds:
        return None
    chosen = next((p for p in preds if p["model_id"] == model_id), None) if model_id else None
    chosen = chosen or preds[0]
    o = OUTCOMES.c
    files = [
        dict(r._mapping)
        for r in conn.execute(
            sa.select(OUTCOMES)
            .where(
                o.study_instance_uid == sa.bindparam("uid", uid, sa.Text),
                o.model_id == sa.bindparam("model_id", chosen["model_id"], sa.Integer),
            )
            .order_by(o.score.desc(), o.sop_instance_uid, o.source_uri)
        )
    ]
    images = [f for f in files if f["outcome"] == "predicted"]
    images.sort(key=lambda f: -(f["score"] if f["score"] is not None else -1.0))
    not_scored = [f for f in files if f["outcome"] != "predicted"]
    rv = REVIEWS.c
    history = [
        dict(r._mapping)
        for r in conn.execute(
            sa.select(REVIEWS)
            .where(rv.study_instance_uid == sa.bindparam("uid", uid, sa.Text))
            .order_by(rv.created_at, rv.review_id)
        )
    ]
    w = WORKLIST.c
    row = conn.execute(
        sa.select(WORKLIST).where(
            w.study_instance_uid == sa.bindparam("uid", uid, sa.Text),
            w.model_id == sa.bindparam("model_id", chosen["model_id"], sa.Integer),
        )
    ).first()
    return Study(
        uid=uid,
        prediction=chosen,
        predictions=preds,
        images=images,
        not_scored=not_scored,
        history=history,
        worklist_row=dict(row._mapping) if row else None,
    )


# -- dashboard ---------------------------------------------------------------------------------


@dataclass
class WeekStats:
    week: dt.date  # the Monday
    flagged: int = 0
    reviewed: int = 0
    agree: int = 0
    disagree: int = 0
    uncertain: int = 0
    hours_to_review: list[float] = field(default_factory=list)

    @property
    def ppv(self) -> float | None:
        judged = self.agree + self.disagree
        return self.agree / judged if judged else None

    @property
    def median_hours(self) -> float | None:
        return statistics.median(self.hours_to_review) if self.hours_to_review else None


def dashboard(conn: Connection, weeks: int, now: dt.datetime | None = None) -> list[dict]:
    """Per model version and ISO week of the flag (prediction time, UTC): flagged studies,
    reviewed, decisions, agreement rate (PPV: agree / (agree + disagree), from each study's
    latest review) and median hours from the flag to the study's first review after it."""
    now = now or dt.datetime.now(dt.UTC)
    monday = (now - dt.timedelta(days=now.weekday())).date()
    start_day = monday - dt.timedelta(weeks=weeks - 1)
    start = dt.datetime.combine(start_day, dt.time(), dt.UTC)
    w = WORKLIST.c
    flagged = conn.execute(
        sa.select(
            w.study_instance_uid,
            w.model_id,
            w.model_name,
            w.model_version,
            w.predicted_at,
            w.decision,
        ).where(w.predicted_at >= sa.bindparam("start", start, UtcDateTime))
    ).all()
    rv = REVIEWS.c
    first_times: dict[str, list[dt.datetime]] = {}
    for uid, created in conn.execute(
        sa.select(rv.study_instance_uid, rv.created_at)
        .where(rv.created_at >= sa.bindparam("start", start, UtcDateTime))
        .order_by(rv.created_at)
    ):
        first_times.setdefault(uid, []).append(created)
    per_model: dict[int, dict[str, Any]] = {}
    for uid, model_id, name, version, predicted_at, decision in flagged:
        entry = per_model.setdefault(
            model_id, {"model_id": model_id, "name": name, "version": version, "weeks": {}}
        )
        day = predicted_at.date()
        week = day - dt.timedelta(days=day.weekday())
        stats = entry["weeks"].setdefault(week, WeekStats(week))
        stats.flagged += 1
        if decision is None:
            continue
        stats.reviewed += 1
        setattr(stats, decision, getattr(stats, decision) + 1)
        times = first_times.get(uid, [])
        i = bisect.bisect_left(times, predicted_at)
        if i < len(times):
            stats.hours_to_review.append((times[i] - predicted_at).total_seconds() / 3600)
    out = []
    for entry in sorted(per_model.values(), key=lambda e: -e["model_id"]):
        all_weeks = [start_day + dt.timedelta(weeks=k) for k in range(weeks)]
        entry["weeks"] = [entry["weeks"].get(wk, WeekStats(wk)) for wk in all_weeks]
        out.append(entry)
    return out


# -- connections -------------------------------------------------------------------------------


def reader(engine: Engine) -> Connection:
    """A read connection (SQLite: a deferred BEGIN, so reads never take the write lock)."""
    return engine.connect().execution_options(sqlite_begin="DEFERRED")
