"""Reviews: a reviewer's decision about a study, appended (never updated); the latest counts.

Written with no more than the PostgreSQL ``cxr_reviewer`` role may do (see ``roles.sql``), so
``cxr-screen review`` works for a reviewer login.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql.schema import DECISIONS, Review, Study
from sql.upsert import utc_now


def add_review(
    session: Session,
    *,
    study_instance_uid: str,
    decision: str,
    reviewer: str,
    note: str | None = None,
    model_id: int | None = None,
    created_at: dt.datetime | None = None,
    reason: str | None = None,
) -> int:
    """Append a review (agree | disagree | uncertain) of a study; the latest one counts.

    Needs only what the PostgreSQL ``cxr_reviewer`` role has: INSERT of the review columns,
    and SELECT on the reviews id sequence to learn the new id (``currval``). The study (and
    the model, when given) must exist; the foreign keys check that, so the writer never reads
    ``studies``.
    """
    if decision not in DECISIONS:
        raise ValueError(f"review decision {decision!r} is not one of {', '.join(DECISIONS)}")
    if not reviewer or not reviewer.strip():
        raise ValueError("a review needs the reviewer's name")
    reviews = Review.__table__
    values: dict[str, Any] = {
        "study_instance_uid": study_instance_uid,
        "model_id": model_id,
        "decision": decision,
        "reviewer": reviewer.strip(),
        "note": note,
    }
    if reason is not None:  # why a reviewer disagreed (the review web page's short list)
        values["reason"] = reason
    postgresql_db = session.get_bind().dialect.name == "postgresql"
    if created_at is not None or not postgresql_db:
        # PostgreSQL reviewers may not set created_at: its default (the transaction's start)
        # applies. SQLite's default has whole seconds only, so the time is given there.
        values["created_at"] = created_at or utc_now()
    # Plain INSERT text: SQLAlchemy would add RETURNING review_id on PostgreSQL, which needs
    # SELECT on reviews (reviewers have none).
    insert = sa.text(
        f"INSERT INTO reviews ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)})"
    ).bindparams(*(sa.bindparam(k, type_=reviews.c[k].type) for k in values))
    try:
        with session.begin_nested():  # a refused insert leaves the caller's transaction usable
            session.execute(insert, values)
            if postgresql_db:
                sequence = sa.func.pg_get_serial_sequence("reviews", "review_id")
                return session.execute(sa.select(sa.func.currval(sequence))).scalar_one()
            return session.execute(sa.text("SELECT last_insert_rowid()")).scalar_one()
    except sa.exc.IntegrityError as exc:
        missing = _missing_review_reference(session, exc, study_instance_uid, model_id)
        if missing is None:
            raise
        raise ValueError(missing) from None


def _missing_review_reference(
    session: Session, exc: sa.exc.IntegrityError, study_instance_uid: str, model_id: int | None
) -> str | None:
    """The reason a review insert broke a foreign key, or None for another integrity error."""
    study = f"study {study_instance_uid} is not in the database; nothing to review"
    model = f"model_id {model_id} is not registered"
    diag = getattr(getattr(exc, "orig", None), "diag", None)
    if diag is not None:  # PostgreSQL names the constraint
        constraint = diag.constraint_name or ""
        if constraint == "fk_reviews_study_instance_uid_studies":
            return study
        if constraint == "fk_reviews_model_id_models":
            return model
        return None
    if "FOREIGN KEY" not in str(exc.orig):
        return None
    # SQLite does not say which key (and has no privileges to respect): look.
    studies = Study.__table__
    found = session.execute(
        sa.select(studies.c.study_instance_uid).where(
            studies.c.study_instance_uid == study_instance_uid
        )
    ).scalar_one_or_none()
    return study if found is None else model
