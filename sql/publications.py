"""Reads and writes for results sent back to the PACS (the ``publications`` table).

- ``results_to_publish``: study results (one per study and model version) from
  ``v_unpublished`` (not yet sent, or changed since) or ``v_study_results`` (all of them).
- ``scored_images``: the images behind one study result (SOP/Series Instance UIDs, score).
- ``model_identity``: what the SR says about the model version.
- ``record_publication``: one attempt, sent or failed, appended in the caller's transaction.

Callers own the session (``with Session.begin() as session:``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql.schema import (
    PUBLICATION_PROTOCOLS,
    PUBLICATION_STATUSES,
    ImagePrediction,
    Instance,
    Model,
    Publication,
    Run,
)

_RESULT_COLUMNS = (
    "study_instance_uid",
    "model_id",
    "model_name",
    "model_version",
    "score",
    "label",
    "threshold",
    "n_images",
    "predicted_at",
    "aggregation",
)


def results_to_publish(
    session: Session,
    *,
    model_ids: Iterable[int] | None = None,
    study_uids: Iterable[str] | None = None,
    unpublished_only: bool = True,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Study results to send, oldest prediction first (a backlog drains in order).

    ``unpublished_only``: from ``v_unpublished`` (never sent successfully, or changed since);
    otherwise every result in ``v_study_results`` (re-publish: same SR UIDs, the PACS replaces).
    """
    view = "v_unpublished" if unpublished_only else "v_study_results"
    table = sa.table(view, *(sa.column(c) for c in _RESULT_COLUMNS))
    query = sa.select(*(table.c[c] for c in _RESULT_COLUMNS)).order_by(
        table.c.predicted_at, table.c.study_instance_uid, table.c.model_id
    )
    if model_ids is not None:
        query = query.where(table.c.model_id.in_(list(model_ids)))
    if study_uids is not None:
        query = query.where(table.c.study_instance_uid.in_(list(study_uids)))
    if limit is not None:
        query = query.limit(limit)
    rows = [dict(r._mapping) for r in session.execute(query)]
    for row in rows:
        row["label"] = bool(row["label"])
        row["predicted_at"] = _utc(row["predicted_at"])
    return rows


def scored_images(session: Session, model_id: int, study_uid: str) -> list[dict[str, Any]]:
    """The predicted images of one study under one model version, by SOP Instance UID."""
    ip, inst = ImagePrediction.__table__, Instance.__table__
    query = (
        sa.select(ip.c.sop_instance_uid, inst.c.series_instance_uid, ip.c.score, ip.c.label)
        .join(inst, inst.c.sop_instance_uid == ip.c.sop_instance_uid)
        .where(ip.c.model_id == model_id, ip.c.study_instance_uid == study_uid)
        .order_by(ip.c.sop_instance_uid)
    )
    return [{**dict(r._mapping), "label": bool(r.label)} for r in session.execute(query)]


def model_identity(session: Session, model_id: int) -> dict[str, Any]:
    m = Model.__table__
    row = session.execute(
        sa.select(
            m.c.name,
            m.c.version,
            m.c.sha256,
            m.c.threshold,
            m.c.positive_class,
            m.c.preprocessing_sha256,
        ).where(m.c.model_id == model_id)
    ).one_or_none()
    if row is None:
        raise ValueError(f"model_id {model_id} is not registered in the models table")
    return dict(row._mapping)


def find_models(session: Session, *, name: str | None, version: str | None) -> list[int]:
    """Model ids matching a name and/or version (both None: every model)."""
    m = Model.__table__
    query = sa.select(m.c.model_id).order_by(m.c.model_id)
    if name is not None:
        query = query.where(m.c.name == name)
    if version is not None:
        query = query.where(m.c.version == version)
    return list(session.execute(query).scalars())


def run_model_id(session: Session, run_id: int) -> int:
    """The model version a screening run used."""
    runs = Run.__table__
    model_id = session.execute(
        sa.select(runs.c.model_id).where(runs.c.run_id == run_id)
    ).scalar_one_or_none()
    if model_id is None:
        raise ValueError(f"run {run_id} is not in the results database or has no model")
    return int(model_id)


def record_publication(
    session: Session,
    *,
    study_instance_uid: str,
    model_id: int,
    destination: str,
    protocol: str,
    sr_sop_class_uid: str,
    sr_series_instance_uid: str,
    sr_sop_instance_uid: str,
    prediction_at: dt.datetime,
    score: float,
    label: bool,
    n_images: int,
    status: str,
    pacs_status: str | None,
    pacs_answer: Mapping[str, Any],
    error: str | None,
    sent_at: dt.datetime | None = None,
) -> int:
    """Append one attempt; returns its ``publication_id``."""
    if status not in PUBLICATION_STATUSES:
        raise ValueError(f"publication status {status!r} is not one of {PUBLICATION_STATUSES}")
    if protocol not in PUBLICATION_PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PUBLICATION_PROTOCOLS}")
    if status == "failed" and not error:
        raise ValueError("a failed publication needs the error that explains it")
    row = Publication(
        study_instance_uid=study_instance_uid,
        model_id=model_id,
        destination=destination,
        protocol=protocol,
        sr_sop_class_uid=sr_sop_class_uid,
        sr_series_instance_uid=sr_series_instance_uid,
        sr_sop_instance_uid=sr_sop_instance_uid,
        prediction_at=prediction_at,
        score=float(score),
        label=bool(label),
        n_images=int(n_images),
        status=status,
        pacs_status=pacs_status,
        pacs_answer=dict(pacs_answer),
        error=error,
        sent_at=sent_at or dt.datetime.now(dt.UTC),
    )
    session.add(row)
    session.flush()
    return row.publication_id


def publications(
    session: Session, *, study_uid: str | None = None, model_id: int | None = None
) -> list[dict[str, Any]]:
    """Publication attempts, oldest first."""
    t = Publication.__table__
    query = sa.select(t).order_by(t.c.publication_id)
    if study_uid is not None:
        query = query.where(t.c.study_instance_uid == study_uid)
    if model_id is not None:
        query = query.where(t.c.model_id == model_id)
    return [dict(r._mapping) for r in session.execute(query)]


def _utc(value: Any) -> Any:
    """Views give timestamps back as text on SQLite and naive values elsewhere: aware UTC."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value
