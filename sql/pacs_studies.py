"""The studies PACS sources found partial (``pacs_pending_studies``, revision 0007).

A query/retrieve run records each study that came short (fewer instances arrived than the
PACS announced) with the reason; the next run from the same PACS asks for those studies again
by UID, and the row goes once a run finds the study complete, or no longer finds it at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql.rows import clean_text
from sql.schema import PacsPendingStudy
from sql.upsert import dialect_insert, utc_now

REASON_LIMIT = 300


def pending_studies(session: Session, pacs: str) -> list[str]:
    """Study Instance UIDs still partial for the PACS named ``pacs`` (oldest first)."""
    table = PacsPendingStudy.__table__
    rows = session.execute(
        sa.select(table.c.study_instance_uid)
        .where(table.c.pacs == pacs)
        .order_by(table.c.updated_at, table.c.study_instance_uid)
    )
    return [r[0] for r in rows]


def record_studies(
    session: Session,
    pacs: str,
    *,
    partial: Mapping[str, str],
    settled: Iterable[str],
    run_id: int | None,
) -> None:
    """Upsert ``partial`` (study UID -> reason; ``attempts`` + 1 for a study already there)
    and delete ``settled`` (complete now, or gone from the PACS)."""
    table = PacsPendingStudy.__table__
    gone = sorted(set(settled) - set(partial))
    if gone:
        session.execute(
            sa.delete(table).where(table.c.pacs == pacs, table.c.study_instance_uid.in_(gone))
        )
    if not partial:
        return
    now = utc_now()
    rows = [
        {
            "pacs": pacs,
            "study_instance_uid": uid,
            "reason": clean_text(reason, REASON_LIMIT),
            "first_run_id": run_id,
            "last_run_id": run_id,
            "attempts": 1,
            "updated_at": now,
        }
        for uid, reason in sorted(partial.items())
    ]
    ins = dialect_insert(session, table)
    session.execute(
        ins.on_conflict_do_update(
            index_elements=["pacs", "study_instance_uid"],
            set_={
                "reason": ins.excluded.reason,
                "last_run_id": ins.excluded.last_run_id,
                "updated_at": ins.excluded.updated_at,
                "attempts": table.c.attempts + 1,
            },
        ),
        rows,
    )
