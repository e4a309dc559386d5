"""Shard manifests for fan-out jobs: the files each sub-flow run screens, and its progress.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = postgresql.JSONB().with_variant(sa.JSON(), "sqlite")
TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table(
        "shard_manifests",
        sa.Column("manifest_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("job_key", TEXT, nullable=False),
        sa.Column("shard_index", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("parameters", JSON, nullable=False),
        sa.Column("files", JSON, nullable=False),
        sa.Column("n_files", sa.Integer(), nullable=False),
        sa.Column("files_sha256", TEXT, nullable=False),
        sa.Column("status", TEXT, nullable=False),
        sa.Column("files_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("counts", JSON, nullable=False),
        sa.Column("study_uids", JSON, nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("worker", TEXT, nullable=True),
        sa.Column("prefect_flow_run_id", TEXT, nullable=True),
        sa.Column("error", TEXT, nullable=True),
        sa.Column("created_at", TIMESTAMP, server_default=NOW, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'failed')",
            name=op.f("ck_shard_manifests_status"),
        ),
        sa.CheckConstraint(
            "n_files >= 0 AND files_done >= 0 AND files_done <= n_files AND attempts >= 0",
            name=op.f("ck_shard_manifests_progress"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_shard_manifests_run_id_runs")
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.model_id"], name=op.f("fk_shard_manifests_model_id_models")
        ),
        sa.PrimaryKeyConstraint("manifest_id", name=op.f("pk_shard_manifests")),
        sa.UniqueConstraint(
            "job_key", "shard_index", name=op.f("uq_shard_manifests_job_key_shard_index")
        ),
    )
    op.create_index(op.f("ix_shard_manifests_run_id"), "shard_manifests", ["run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_shard_manifests_run_id"), table_name="shard_manifests")
    op.drop_table("shard_manifests")
