"""Publish study results to a PACS: read them from the results database, build one SR per study
and model version, send it, record the attempt.

For each study result (``sql.publications.results_to_publish``):

1. its scored images (``scored_images``) and the model's identity;
2. the images' headers from the destination PACS (``destination.evidence``): a study the PACS
   does not hold fails with that reason (the SR would create an orphan study there);
3. ``build_sr`` (Comprehensive 3D SR), ``destination.send``; when the PACS refuses that SOP
   class, the same SR content as Comprehensive SR, same UIDs, sent again;
4. one ``publications`` row per attempt, committed at once (a crash later keeps it).

Fatal errors (PACS unreachable, credentials or AE title refused) stop the batch: they raise
``PacsError`` after the attempts so far are recorded. Everything else fails that one study with
its reason and the batch goes on. Nothing is written to disk; logs carry counts only.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from sql.publications import (
    model_identity,
    record_publication,
    results_to_publish,
    scored_images,
)
from tasks.dicom.pacs.common import PacsError
from tasks.publish.destinations import NotInPacs, SendResult
from tasks.publish.sr import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    ImageResult,
    ModelIdentity,
    SRBuildError,
    StudyResult,
    build_sr,
    sr_identity,
)

log = logging.getLogger(__name__)


@dataclass
class PublishSummary:
    destination: str
    considered: int = 0
    sent: int = 0
    failed: int = 0
    fallback_comprehensive: int = 0  # sent as Comprehensive SR after a refusal of 3D
    reasons: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "considered": self.considered,
            "sent": self.sent,
            "failed": self.failed,
            "fallback_comprehensive": self.fallback_comprehensive,
            "top_reasons": [{"studies": n, "reason": r} for r, n in self.reasons.most_common(10)],
        }


def publish_results(
    sessions: sessionmaker[Session],
    destination,
    *,
    model_ids: Iterable[int] | None = None,
    study_uids: Iterable[str] | None = None,
    unpublished_only: bool = True,
    limit: int | None = None,
    sop_class_uid: str = COMPREHENSIVE_3D_SR,
    institution_name: str | None = None,
    software_version: str = "cxr-screen",
) -> PublishSummary:
    """Send the selected study results to ``destination``; see the module text."""
    with sessions.begin() as session:
        todo = results_to_publish(
            session,
            model_ids=model_ids,
            study_uids=study_uids,
            unpublished_only=unpublished_only,
            limit=limit,
        )
        models: dict[int, ModelIdentity] = {}
        for row in todo:
            if row["model_id"] not in models:
                models[row["model_id"]] = ModelIdentity(**model_identity(session, row["model_id"]))
    summary = PublishSummary(destination.describe())
    for row in todo:
        summary.considered += 1
        model = models[row["model_id"]]
        _publish_one(
            sessions,
            destination,
            row,
            model,
            summary,
            sop_class_uid=sop_class_uid,
            institution_name=institution_name,
            software_version=software_version,
        )
    log.info(
        "published to %s: %d considered, %d sent, %d failed",
        destination.name,
        summary.considered,
        summary.sent,
        summary.failed,
    )
    return summary


def _publish_one(
    sessions,
    destination,
    row: dict[str, Any],
    model: ModelIdentity,
    summary: PublishSummary,
    **build_options,
) -> None:
    study_uid = row["study_instance_uid"]
    identity = sr_identity(study_uid, model)
    sop_class = build_options.pop("sop_class_uid")
    with sessions.begin() as session:
        images = scored_images(session, row["model_id"], study_uid)
    result = StudyResult(
        study_instance_uid=study_uid,
        score=row["score"],
        label=row["label"],
        threshold=row["threshold"],
        aggregation=row["aggregation"],
        images=tuple(
            ImageResult(
                i["sop_instance_uid"], i["series_instance_uid"] or "", i["score"], i["label"]
            )
            for i in images
        ),
    )
    outcome: SendResult | None = None
    error: str | None = None
    fatal: PacsError | None = None
    try:
        evidence = destination.evidence(study_uid, [i.sop_instance_uid for i in result.images])
        sr = build_sr(result, model, evidence, sop_class_uid=sop_class, **build_options)
        outcome = destination.send(sr)
        if not outcome.ok and outcome.sop_class_refused and sop_class == COMPREHENSIVE_3D_SR:
            first = outcome
            sop_class = COMPREHENSIVE_SR
            sr = build_sr(result, model, evidence, sop_class_uid=sop_class, **build_options)
            outcome = destination.send(sr)
            outcome.answer["first_attempt"] = {
                "sop_class_uid": COMPREHENSIVE_3D_SR,
                "pacs_status": first.pacs_status,
                "error": first.error,
            }
            if outcome.ok:
                summary.fallback_comprehensive += 1
        if not outcome.ok:
            error = outcome.error or "the PACS did not store the SR"
    except (NotInPacs, SRBuildError) as exc:
        error = str(exc)
    except PacsError as exc:  # recorded, then the whole batch stops
        error, fatal = str(exc), exc
    status = "sent" if error is None else "failed"
    with sessions.begin() as session:
        record_publication(
            session,
            study_instance_uid=study_uid,
            model_id=row["model_id"],
            destination=destination.describe(),
            protocol=destination.protocol,
            sr_sop_class_uid=sop_class,
            sr_series_instance_uid=identity.series_instance_uid,
            sr_sop_instance_uid=identity.sop_instance_uid,
            prediction_at=row["predicted_at"],
            score=row["score"],
            label=row["label"],
            n_images=row["n_images"],
            status=status,
            pacs_status=outcome.pacs_status if outcome else None,
            pacs_answer=outcome.answer if outcome else {},
            error=error,
        )
    if status == "sent":
        summary.sent += 1
    else:
        summary.failed += 1
        summary.reasons[_generic(error or "")] += 1
    if fatal is not None:
        raise fatal


def _generic(reason: str) -> str:
    """A reason with its UIDs replaced, so the summary groups alike failures."""
    return re.sub(r"\b\d+(\.\d+){3,}\b", "<uid>", reason)
