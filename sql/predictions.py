"""Predictions: image predictions in bulk, study predictions aggregated from them in SQL, and
the planner's lookup of what a model version has already predicted.

``write_shard`` (``sql.shards``) stores a shard's image predictions through
``upsert_image_predictions``; the caller then aggregates the shard's studies::

    with Session.begin() as session:
        result = write_shard(session, ...)
        upsert_study_predictions(session, model_id, run_id, study_uids=result.study_uids)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sql.rows import check_probability, fingerprint_scheme
from sql.runs import require_models_and_runs
from sql.schema import (
    AGGREGATIONS,
    FileOutcome,
    ImagePrediction,
    Instance,
    Model,
    StudyPrediction,
)
from sql.upsert import dialect_insert, member_of, on_conflict, upsert_rows, utc_now

_STUDY_COLUMNS = [
    "study_instance_uid",
    "model_id",
    "aggregation",
    "n_images",
    "score",
    "label",
    "threshold",
    "run_id",
    "predicted_at",
]
_STUDY_COMPARE = ["aggregation", "n_images", "score", "label", "threshold"]


def upsert_image_predictions(
    session: Session, rows: list[dict[str, Any]], *, force: bool = False, verify: bool = True
) -> None:
    """Upsert image_predictions rows (every column given; unique on sop_instance_uid+model_id).

    ``write_shard`` calls this (with ``verify=False``: it has checked the references already);
    it is public for bulk loads and the benchmark. With ``verify`` the models, runs and
    instances the rows refer to must exist (one set-based check per call).
    """
    table = ImagePrediction.__table__
    keys = ["sop_instance_uid", "model_id"]
    compare = ["study_instance_uid", "score", "label", "threshold", "preprocessing_sha256"]
    if verify and rows:
        require_models_and_runs(session, {r["model_id"] for r in rows}, {r["run_id"] for r in rows})
    upsert_rows(
        session,
        table,
        rows,
        keys=keys,
        build=lambda ins: on_conflict(
            ins, table, keys, [*compare, "run_id", "predicted_at"], compare, force
        ),
        verify=_verify_instances if verify else None,
    )


def _verify_instances(session: Session, rows: list[dict[str, Any]], staged: Any) -> None:
    """Every row's (sop_instance_uid, study_instance_uid) must be a stored instance."""
    instances = Instance.__table__
    if staged is not None:
        orphans = session.execute(
            sa.select(staged.c.sop_instance_uid, staged.c.study_instance_uid)
            .outerjoin(instances, instances.c.sop_instance_uid == staged.c.sop_instance_uid)
            .where(
                sa.or_(
                    instances.c.sop_instance_uid.is_(None),
                    instances.c.study_instance_uid != staged.c.study_instance_uid,
                )
            )
            .limit(3)
        ).all()
    else:
        studies: dict[str, str] = {}
        uids = (r["sop_instance_uid"] for r in rows)
        for where in member_of(session, instances.c.sop_instance_uid, uids):
            query = sa.select(instances.c.sop_instance_uid, instances.c.study_instance_uid)
            studies.update((sop, study) for sop, study in session.execute(query.where(where)))
        orphans = [
            (r["sop_instance_uid"], r["study_instance_uid"])
            for r in rows
            if studies.get(r["sop_instance_uid"]) != r["study_instance_uid"]
        ][:3]
    if orphans:
        sop, study = orphans[0]
        raise ValueError(
            f"image prediction for SOP Instance UID {sop} (study {study}) has no matching stored "
            "instance; write the instance first (write_shard does both)"
        )


def upsert_study_predictions(
    session: Session,
    model_id: int,
    run_id: int,
    rule: str = "max",
    study_uids: Iterable[str] | None = None,
    *,
    threshold: float | None = None,
    force: bool = False,
) -> None:
    """(Re)compute study predictions from image_predictions in SQL, one statement per chunk.

    ``rule``: ``max`` (the study is as positive as its most positive image) or ``mean``.
    The label is ``score >= threshold``, the threshold defaulting to the model's.
    ``study_uids``: the studies to aggregate (None: every study this model predicted).
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation rule {rule!r} is not one of {', '.join(AGGREGATIONS)}")
    if threshold is None:
        threshold = _model_threshold(session, model_id)
    threshold = check_probability("study threshold", threshold)
    ip = ImagePrediction.__table__
    table = StudyPrediction.__table__
    score = sa.func.max(ip.c.score) if rule == "max" else sa.func.avg(ip.c.score)
    now = utc_now()

    def statement(where):
        select = (
            sa.select(
                ip.c.study_instance_uid,
                sa.literal(model_id, sa.Integer),
                sa.literal(rule, sa.Text),
                sa.func.count(),
                score,
                sa.case((score >= threshold, sa.true()), else_=sa.false()),
                sa.literal(threshold, sa.Double),
                sa.literal(run_id, sa.Integer),
                sa.literal(now, table.c.predicted_at.type),
            )
            .where(ip.c.model_id == model_id, where)
            .group_by(ip.c.study_instance_uid)
            .order_by(ip.c.study_instance_uid)
        )
        ins = dialect_insert(session, table).from_select(_STUDY_COLUMNS, select)
        return on_conflict(
            ins,
            table,
            ["study_instance_uid", "model_id"],
            [*_STUDY_COMPARE, "run_id", "predicted_at"],
            _STUDY_COMPARE,
            force,
        )

    if study_uids is None:
        session.execute(statement(sa.true()))
        return
    for where in member_of(session, ip.c.study_instance_uid, study_uids):
        session.execute(statement(where))


def _model_threshold(session: Session, model_id: int) -> float:
    models = Model.__table__
    threshold = session.execute(
        sa.select(models.c.threshold).where(models.c.model_id == model_id)
    ).scalar_one_or_none()
    if threshold is None:
        raise ValueError(f"model {model_id} does not exist")
    return threshold


def predicted_sop_uids(session: Session, model_id: int, sop_uids: Iterable[str]) -> set[str]:
    """The subset of ``sop_uids`` this model version already predicted (the planner's skip)."""
    table = ImagePrediction.__table__
    found: set[str] = set()
    for where in member_of(session, table.c.sop_instance_uid, sop_uids):
        found.update(
            session.execute(
                sa.select(table.c.sop_instance_uid).where(table.c.model_id == model_id, where)
            ).scalars()
        )
    return found


def predicted_files(session: Session, model_id: int, files: Iterable[tuple[str, str]]) -> set[str]:
    """The source URIs among ``files`` ((source_uri, sop_instance_uid) pairs) that this model
    version already predicted *from that file*: their stored outcome is ``predicted`` for the
    same SOP Instance UID. The planner skips these without decoding them; another file with a
    predicted UID (a copy) is decoded and compared by content (``sql.shards``)."""
    table = FileOutcome.__table__
    wanted = dict(files)
    found: set[str] = set()
    for where in member_of(session, table.c.source_uri, wanted):
        query = sa.select(table.c.source_uri, table.c.sop_instance_uid).where(
            table.c.model_id == model_id, table.c.outcome == "predicted", where
        )
        found.update(uri for uri, uid in session.execute(query) if wanted.get(uri) == uid)
    return found


class RecordedAt(NamedTuple):
    """What the database holds for source URIs whose files have not been read yet."""

    predicted: dict[str, str]  # URI -> the SOP Instance UID this model version predicted there
    uids: dict[str, tuple[str, ...]]  # URI -> the UIDs any model version recorded there


def recorded_at(session: Session, model_id: int, uris: Iterable[str]) -> RecordedAt:
    """For files not read yet (the decode worker scans them): per source URI, the UID that
    this model version predicted from it (a file there that still has that UID is skipped, as
    :func:`predicted_files` decides for a scanned file), and the UIDs recorded there by any
    model version (the planner gives the worker their stored identity, ``stored_uids``)."""
    table = FileOutcome.__table__
    predicted: dict[str, str] = {}
    found: dict[str, set[str]] = {}
    columns = (table.c.source_uri, table.c.model_id, table.c.sop_instance_uid, table.c.outcome)
    for where in member_of(session, table.c.source_uri, uris):
        query = sa.select(*columns).where(where, table.c.sop_instance_uid.is_not(None))
        for uri, model, uid, outcome in session.execute(query):
            found.setdefault(uri, set()).add(uid)
            if model == model_id and outcome == "predicted":
                predicted[uri] = uid
    return RecordedAt(predicted, {uri: tuple(sorted(u)) for uri, u in found.items()})


class StoredIdentity(NamedTuple):
    """What identifies a stored instance's content, for the planner: its content hash and the
    scheme of its pixel fingerprint (the text before its ``:``; '' when it has none)."""

    content_sha256: str
    pixel_scheme: str


def stored_uids(session: Session, sop_uids: Iterable[str]) -> dict[str, StoredIdentity]:
    """The subset of ``sop_uids`` stored as instances (by any run or model version), each with
    its :class:`StoredIdentity`: a file with such a UID may be a copy, and unless it has the
    stored content hash it needs a fingerprint the stored one can be compared with
    (``sql.shards.same_content``)."""
    table = Instance.__table__
    found: dict[str, StoredIdentity] = {}
    columns = (table.c.sop_instance_uid, table.c.content_sha256, table.c.pixel_fingerprint)
    for where in member_of(session, table.c.sop_instance_uid, sop_uids):
        for uid, content, pixel in session.execute(sa.select(*columns).where(where)):
            found[uid] = StoredIdentity(content, fingerprint_scheme(pixel or ""))
    return found
