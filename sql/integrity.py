"""The integrity audit: references the per-file tables do not enforce with FOREIGN KEYs.

``instances``, ``file_outcomes`` and ``image_predictions`` have no foreign keys (on PostgreSQL
each is a trigger call per row, which more than doubled a bulk upsert); the writers check
references per call instead, and ``check_integrity`` audits the whole database for orphans
(the tests run it after concurrent and bulk writes; there is no CLI command for it yet).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

_INTEGRITY_CHECKS = {
    "image_predictions_without_instance": """
        SELECT COUNT(*) FROM image_predictions AS p
        WHERE NOT EXISTS (
            SELECT 1 FROM instances AS i WHERE i.sop_instance_uid = p.sop_instance_uid)""",
    "image_predictions_with_other_study": """
        SELECT COUNT(*) FROM image_predictions AS p
        JOIN instances AS i ON i.sop_instance_uid = p.sop_instance_uid
        WHERE i.study_instance_uid <> p.study_instance_uid""",
    "image_predictions_without_model": """
        SELECT COUNT(*) FROM image_predictions AS p
        WHERE NOT EXISTS (SELECT 1 FROM models AS m WHERE m.model_id = p.model_id)""",
    "image_predictions_without_run": """
        SELECT COUNT(*) FROM image_predictions AS p
        WHERE NOT EXISTS (SELECT 1 FROM runs AS r WHERE r.run_id = p.run_id)""",
    "file_outcomes_without_model": """
        SELECT COUNT(*) FROM file_outcomes AS o
        WHERE NOT EXISTS (SELECT 1 FROM models AS m WHERE m.model_id = o.model_id)""",
    "file_outcomes_without_run": """
        SELECT COUNT(*) FROM file_outcomes AS o
        WHERE NOT EXISTS (SELECT 1 FROM runs AS r WHERE r.run_id = o.run_id)""",
    "predicted_outcomes_without_prediction": """
        SELECT COUNT(*) FROM file_outcomes AS o
        WHERE o.outcome = 'predicted' AND NOT EXISTS (
            SELECT 1 FROM image_predictions AS p
            WHERE p.sop_instance_uid = o.sop_instance_uid AND p.model_id = o.model_id)""",
    "instances_without_study": """
        SELECT COUNT(*) FROM instances AS i
        WHERE NOT EXISTS (
            SELECT 1 FROM studies AS s WHERE s.study_instance_uid = i.study_instance_uid)""",
    "instances_without_run": """
        SELECT COUNT(*) FROM instances AS i
        WHERE i.first_seen_run_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM runs AS r WHERE r.run_id = i.first_seen_run_id)""",
}


def check_integrity(session: Session) -> dict[str, int]:
    """Count rows breaking a reference the per-file tables do not enforce with FOREIGN KEYs.

    Returns ``{check name: number of offending rows}``; all zeros means consistent. Full
    scans: meant for an occasional audit, not for every run.
    """
    return {
        name: session.execute(sa.text(sql)).scalar_one() for name, sql in _INTEGRITY_CHECKS.items()
    }
