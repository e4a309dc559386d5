"""The review web page: web_users (logins with argon2 password hashes), reviews.reason (why
a reviewer disagreed), v_worklist (flagged study predictions with their latest review) and an
index that walks them in score order, and the pixel-path facts and view position in
v_instance_outcomes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

VIEWS holds frozen copies of sql/views/*.sql as of this revision (v_instance_outcomes,
v_latest_reviews and v_reviews gain columns at the end, v_worklist is new).

On PostgreSQL the changed views are replaced in place (CREATE OR REPLACE keeps their grants)
and an existing cxr_reviewer role gets what sql/roles.sql grants as of this revision: SELECT on
v_worklist and on web_users (the web page's login reads it; a reviewer login can change no
user), and INSERT of reviews.reason. On SQLite the views are dropped and created again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
NOW = sa.text("CURRENT_TIMESTAMP")

# View name -> the CREATE VIEW statement as of this revision (frozen copies of sql/views/).
VIEWS: dict[str, str] = {
    "v_instance_outcomes": """\
-- One row per source file and model version: what happened to the file, and its score if
-- it was predicted. A file that failed before its UIDs were read has NULL UIDs.
-- Contract columns: source_uri, sop_instance_uid, study_instance_uid, outcome
-- (predicted | skipped | failed), reason, score, model_version, run_id.
-- facts: what the pixel path did to a predicted image (decoder, window, inversion,
-- reduction, sizes); view_position and modality from the image's header.
CREATE VIEW v_instance_outcomes AS
SELECT
    fo.source_uri,
    fo.sop_instance_uid,
    fo.study_instance_uid,
    fo.outcome,
    fo.reason,
    ip.score,
    m.version AS model_version,
    fo.run_id,
    m.name AS model_name,
    fo.model_id,
    ip.label,
    fo.thumbnail_path,
    fo.updated_at,
    fo.facts,
    i.view_position,
    i.modality
FROM file_outcomes AS fo
JOIN models AS m ON m.model_id = fo.model_id
LEFT JOIN instances AS i ON i.sop_instance_uid = fo.sop_instance_uid
LEFT JOIN image_predictions AS ip
    ON ip.sop_instance_uid = fo.sop_instance_uid
    AND ip.model_id = fo.model_id
    AND fo.outcome = 'predicted'
""",
    "v_latest_reviews": """\
-- The review that counts for each study: the latest one (reviews are append-only history).
CREATE VIEW v_latest_reviews AS
SELECT
    r.study_instance_uid,
    r.review_id,
    r.decision,
    r.reviewer,
    r.note,
    r.created_at,
    r.model_id,
    m.name AS model_name,
    m.version AS model_version,
    r.reason
FROM (
    SELECT
        rv.study_instance_uid,
        rv.review_id,
        rv.decision,
        rv.reviewer,
        rv.note,
        rv.created_at,
        rv.model_id,
        rv.reason,
        ROW_NUMBER() OVER (
            PARTITION BY rv.study_instance_uid
            ORDER BY rv.created_at DESC, rv.review_id DESC
        ) AS recency
    FROM reviews AS rv
) AS r
LEFT JOIN models AS m ON m.model_id = r.model_id
WHERE r.recency = 1
""",
    "v_reviews": """\
-- Every review ever recorded (reviews are append-only history), oldest first within a study;
-- v_latest_reviews has the one that counts. For statistics such as reviewer agreement.
-- reason: why a reviewer disagreed (the review page's short list), NULL otherwise.
CREATE VIEW v_reviews AS
SELECT
    rv.review_id,
    rv.study_instance_uid,
    rv.decision,
    rv.reviewer,
    rv.note,
    rv.created_at,
    rv.model_id,
    m.name AS model_name,
    m.version AS model_version,
    rv.reason
FROM reviews AS rv
LEFT JOIN models AS m ON m.model_id = rv.model_id
""",
    "v_worklist": """\
-- The review page's worklist: one row per flagged study prediction (a study and a model
-- version whose study prediction is positive), with the study's latest review, if any.
-- is_latest is 1 when this is the study's most recent prediction of any model version (the
-- one v_review_queue goes by). Reviews belong to the study: the latest one counts whichever
-- model version it was recorded against (review_model_id says which).
CREATE VIEW v_worklist AS
SELECT
    sp.study_instance_uid,
    st.accession_number,
    st.study_date,
    m.name AS model_name,
    m.version AS model_version,
    sp.score,
    sp.threshold,
    sp.n_images,
    sp.model_id,
    sp.run_id,
    sp.predicted_at,
    CASE WHEN EXISTS (
        SELECT 1
        FROM study_predictions AS newer
        WHERE newer.study_instance_uid = sp.study_instance_uid
            AND (
                newer.predicted_at > sp.predicted_at
                OR (newer.predicted_at = sp.predicted_at AND newer.model_id > sp.model_id)
            )
    ) THEN 0 ELSE 1 END AS is_latest,
    rv.review_id,
    rv.decision,
    rv.reason,
    rv.note,
    rv.reviewer,
    rv.created_at AS reviewed_at,
    rv.model_id AS review_model_id
FROM study_predictions AS sp
JOIN studies AS st ON st.study_instance_uid = sp.study_instance_uid
JOIN models AS m ON m.model_id = sp.model_id
LEFT JOIN reviews AS rv ON rv.review_id = (
    SELECT r.review_id
    FROM reviews AS r
    WHERE r.study_instance_uid = sp.study_instance_uid
    ORDER BY r.created_at DESC, r.review_id DESC
    LIMIT 1
)
WHERE sp.label = TRUE
""",
}

# The changed views as revision 0003 left them (for the downgrade).
PREVIOUS_VIEWS: dict[str, str] = {
    "v_instance_outcomes": """\
-- One row per source file and model version: what happened to the file, and its score if
-- it was predicted. A file that failed before its UIDs were read has NULL UIDs.
-- Contract columns: source_uri, sop_instance_uid, study_instance_uid, outcome
-- (predicted | skipped | failed), reason, score, model_version, run_id.
CREATE VIEW v_instance_outcomes AS
SELECT
    fo.source_uri,
    fo.sop_instance_uid,
    fo.study_instance_uid,
    fo.outcome,
    fo.reason,
    ip.score,
    m.version AS model_version,
    fo.run_id,
    m.name AS model_name,
    fo.model_id,
    ip.label,
    fo.thumbnail_path,
    fo.updated_at
FROM file_outcomes AS fo
JOIN models AS m ON m.model_id = fo.model_id
LEFT JOIN image_predictions AS ip
    ON ip.sop_instance_uid = fo.sop_instance_uid
    AND ip.model_id = fo.model_id
    AND fo.outcome = 'predicted'
""",
    "v_latest_reviews": """\
-- The review that counts for each study: the latest one (reviews are append-only history).
CREATE VIEW v_latest_reviews AS
SELECT
    r.study_instance_uid,
    r.review_id,
    r.decision,
    r.reviewer,
    r.note,
    r.created_at,
    r.model_id,
    m.name AS model_name,
    m.version AS model_version
FROM (
    SELECT
        rv.study_instance_uid,
        rv.review_id,
        rv.decision,
        rv.reviewer,
        rv.note,
        rv.created_at,
        rv.model_id,
        ROW_NUMBER() OVER (
            PARTITION BY rv.study_instance_uid
            ORDER BY rv.created_at DESC, rv.review_id DESC
        ) AS recency
    FROM reviews AS rv
) AS r
LEFT JOIN models AS m ON m.model_id = r.model_id
WHERE r.recency = 1
""",
    "v_reviews": """\
-- Every review ever recorded (reviews are append-only history), oldest first within a study;
-- v_latest_reviews has the one that counts. For statistics such as reviewer agreement.
CREATE VIEW v_reviews AS
SELECT
    rv.review_id,
    rv.study_instance_uid,
    rv.decision,
    rv.reviewer,
    rv.note,
    rv.created_at,
    rv.model_id,
    m.name AS model_name,
    m.version AS model_version
FROM reviews AS rv
LEFT JOIN models AS m ON m.model_id = rv.model_id
""",
}

REVIEWER_GRANTS = """\
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cxr_reviewer') THEN
        GRANT SELECT ON v_worklist TO cxr_reviewer;
        GRANT SELECT ON web_users TO cxr_reviewer;
        GRANT INSERT (reason) ON reviews TO cxr_reviewer;
    END IF;
END
$grants$
"""

PREVIOUS_GRANTS = """\
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cxr_reviewer') THEN
        GRANT SELECT ON v_instance_outcomes, v_latest_reviews, v_reviews TO cxr_reviewer;
    END IF;
END
$grants$
"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    postgresql_db = _postgresql()
    op.create_table(
        "web_users",
        sa.Column("user_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("username", TEXT, nullable=False),
        sa.Column("password_hash", TEXT, nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("created_at", TIMESTAMP, server_default=NOW, nullable=False),
        sa.Column("updated_at", TIMESTAMP, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_web_users")),
        sa.UniqueConstraint("username", name=op.f("uq_web_users_username")),
    )
    op.add_column("reviews", sa.Column("reason", TEXT, nullable=True))
    # The worklist walks flagged predictions in score order and stops after a page.
    op.create_index(
        op.f("ix_study_predictions_label_score"), "study_predictions", ["label", "score"]
    )
    for name in ("v_instance_outcomes", "v_latest_reviews", "v_reviews"):
        if postgresql_db:
            op.execute(VIEWS[name].replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
        else:
            op.execute(f"DROP VIEW {name}")
            op.execute(VIEWS[name])
    op.execute(VIEWS["v_worklist"])
    if postgresql_db:
        op.execute(REVIEWER_GRANTS)


def downgrade() -> None:
    postgresql_db = _postgresql()
    op.execute("DROP VIEW v_worklist")
    for name in ("v_instance_outcomes", "v_latest_reviews", "v_reviews"):
        op.execute(f"DROP VIEW {name}")
    if postgresql_db:
        op.drop_column("reviews", "reason")
    else:
        # SQLite drops a column in place (3.35+) once no view reads it; no table rebuild.
        op.execute("ALTER TABLE reviews DROP COLUMN reason")
    for name in ("v_instance_outcomes", "v_latest_reviews", "v_reviews"):
        op.execute(PREVIOUS_VIEWS[name])
    if postgresql_db:
        op.execute(PREVIOUS_GRANTS)
    op.drop_index(op.f("ix_study_predictions_label_score"), table_name="study_predictions")
    op.drop_table("web_users")
