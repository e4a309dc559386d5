"""Results back to the PACS: publications (every attempt to send a study's result as a DICOM
SR: the SR's UIDs, the destination, when, and the PACS's answer) and v_unpublished (study
results no successful publication has sent, or whose result changed since).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

VIEWS holds the frozen copy of sql/views/v_unpublished.sql as of this revision. On PostgreSQL
an existing cxr_reviewer role may read the new view (what sql/roles.sql grants on every v_*).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = postgresql.JSONB().with_variant(sa.JSON(), "sqlite")
TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)

# View name -> the CREATE VIEW statement as of this revision (frozen copies of sql/views/).
VIEWS: dict[str, str] = {
    "v_unpublished": """\
-- One row per study result (study and model version) that no successful publication has sent
-- to a PACS yet, or whose result changed after the last one that was sent (more images
-- arrived, a recomputation): what `cxr-screen publish --unpublished` sends.
-- last_attempt_at / last_status / last_error: the latest attempt for it, if any.
CREATE VIEW v_unpublished AS
SELECT
    sp.study_instance_uid,
    st.accession_number,
    st.study_date,
    m.name AS model_name,
    m.version AS model_version,
    sp.score,
    sp.label,
    sp.threshold,
    sp.n_images,
    sp.predicted_at,
    sp.model_id,
    sp.aggregation,
    last.sent_at AS last_attempt_at,
    last.status AS last_status,
    last.error AS last_error
FROM study_predictions AS sp
JOIN studies AS st ON st.study_instance_uid = sp.study_instance_uid
JOIN models AS m ON m.model_id = sp.model_id
LEFT JOIN publications AS last
    ON last.publication_id = (
        SELECT MAX(p.publication_id)
        FROM publications AS p
        WHERE p.study_instance_uid = sp.study_instance_uid AND p.model_id = sp.model_id
    )
WHERE NOT EXISTS (
    SELECT 1
    FROM publications AS ok
    WHERE ok.study_instance_uid = sp.study_instance_uid
        AND ok.model_id = sp.model_id
        AND ok.status = 'sent'
        AND ok.prediction_at >= sp.predicted_at
)
""",
}

REVIEWER_GRANTS = """\
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cxr_reviewer') THEN
        GRANT SELECT ON v_unpublished TO cxr_reviewer;
    END IF;
END
$grants$
"""


def upgrade() -> None:
    op.create_table(
        "publications",
        sa.Column("publication_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("study_instance_uid", TEXT, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("destination", TEXT, nullable=False),
        sa.Column("protocol", TEXT, nullable=False),
        sa.Column("sr_sop_class_uid", TEXT, nullable=False),
        sa.Column("sr_series_instance_uid", TEXT, nullable=False),
        sa.Column("sr_sop_instance_uid", TEXT, nullable=False),
        sa.Column("prediction_at", TIMESTAMP, nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("label", sa.Boolean(), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("status", TEXT, nullable=False),
        sa.Column("pacs_status", TEXT, nullable=True),
        sa.Column("pacs_answer", JSON, nullable=False),
        sa.Column("error", TEXT, nullable=True),
        sa.Column("sent_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint("status IN ('sent', 'failed')", name=op.f("ck_publications_status")),
        sa.CheckConstraint(
            "protocol IN ('STOW-RS', 'C-STORE')", name=op.f("ck_publications_protocol")
        ),
        sa.CheckConstraint(
            "status = 'sent' OR error IS NOT NULL", name=op.f("ck_publications_error_required")
        ),
        sa.ForeignKeyConstraint(
            ["study_instance_uid"],
            ["studies.study_instance_uid"],
            name=op.f("fk_publications_study_instance_uid_studies"),
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.model_id"], name=op.f("fk_publications_model_id_models")
        ),
        sa.PrimaryKeyConstraint("publication_id", name=op.f("pk_publications")),
    )
    op.create_index(
        op.f("ix_publications_study_instance_uid_model_id"),
        "publications",
        ["study_instance_uid", "model_id"],
    )
    op.create_index(op.f("ix_publications_sent_at"), "publications", ["sent_at"])
    op.execute(VIEWS["v_unpublished"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(REVIEWER_GRANTS)


def downgrade() -> None:
    op.execute("DROP VIEW v_unpublished")
    op.drop_index(op.f("ix_publications_sent_at"), table_name="publications")
    op.drop_index(op.f("ix_publications_study_instance_uid_model_id"), table_name="publications")
    op.drop_table("publications")
