"""Studies a PACS source found partial: pacs_pending_studies (one row per PACS and study,
deleted once a run finds the study complete or the PACS no longer has it).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

A query/retrieve run (tasks.dicom.pacs) compares the instances the PACS announced per series
with what arrived; a study that came short is screened but not aggregated, recorded here, and
asked for again by its Study Instance UID on the next run from the same PACS. No view reads the
table; on PostgreSQL the cxr_reviewer role is not granted it (it holds nothing to review).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pacs_pending_studies",
        sa.Column("pacs", TEXT, nullable=False),
        sa.Column("study_instance_uid", TEXT, nullable=False),
        sa.Column("reason", TEXT, nullable=False),
        sa.Column("first_run_id", sa.Integer(), nullable=True),
        sa.Column("last_run_id", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["first_run_id"],
            ["runs.run_id"],
            name=op.f("fk_pacs_pending_studies_first_run_id_runs"),
        ),
        sa.ForeignKeyConstraint(
            ["last_run_id"],
            ["runs.run_id"],
            name=op.f("fk_pacs_pending_studies_last_run_id_runs"),
        ),
        sa.PrimaryKeyConstraint("pacs", "study_instance_uid", name=op.f("pk_pacs_pending_studies")),
    )


def downgrade() -> None:
    op.drop_table("pacs_pending_studies")
