"""Run liveness and reviewer reads: runs.heartbeat_at, the 'abandoned' run status, the
heartbeat in v_run_summary, and v_reviews (the full review history, for the example queries
that a reviewer login runs).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

VIEWS holds frozen copies of sql/views/*.sql as of this revision (v_run_summary changed,
v_reviews is new).

On SQLite the runs table is rebuilt (batch mode: a CHECK constraint cannot be altered in
place); sql.db runs migrations with foreign keys off for that, and checks them before
committing. v_run_summary reads runs, so it is dropped first (SQLite re-parses views when the
rebuilt table is renamed). On PostgreSQL the view is replaced in place, which keeps its grants,
and an existing cxr_reviewer role gets the grants sql/roles.sql gives as of this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
NOW = sa.text("CURRENT_TIMESTAMP")
STATUSES = "status IN ('running', 'completed', 'failed', 'abandoned')"
PREVIOUS_STATUSES = "status IN ('running', 'completed', 'failed')"

# View name -> the CREATE VIEW statement as of this revision (frozen copies of sql/views/).
VIEWS: dict[str, str] = {
    "v_run_summary": """\
-- One row per run. For a completed run files_seen = predicted + skipped + failed.
-- status: running, completed, failed, or abandoned (a run that stopped giving signs of life:
-- its process was killed; error says when and which run noticed). heartbeat_at: the run's
-- last sign of life (its start, then each committed shard).
-- Contract columns: run_id, kind, source, started_at, finished_at, status, files_seen,
-- predicted, skipped, failed.
CREATE VIEW v_run_summary AS
SELECT
    r.run_id,
    r.kind,
    r.source,
    r.started_at,
    r.finished_at,
    r.status,
    r.files_seen,
    r.predicted,
    r.skipped,
    r.failed,
    m.name AS model_name,
    m.version AS model_version,
    r.model_id,
    r.prefect_flow_run_id,
    r.error,
    r.heartbeat_at
FROM runs AS r
LEFT JOIN models AS m ON m.model_id = r.model_id
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

# v_run_summary as revision 0001 created it (for the downgrade).
PREVIOUS_RUN_SUMMARY = """\
-- One row per run. For a completed run files_seen = predicted + skipped + failed.
-- Contract columns: run_id, kind, source, started_at, finished_at, status, files_seen,
-- predicted, skipped, failed.
CREATE VIEW v_run_summary AS
SELECT
    r.run_id,
    r.kind,
    r.source,
    r.started_at,
    r.finished_at,
    r.status,
    r.files_seen,
    r.predicted,
    r.skipped,
    r.failed,
    m.name AS model_name,
    m.version AS model_version,
    r.model_id,
    r.prefect_flow_run_id,
    r.error
FROM runs AS r
LEFT JOIN models AS m ON m.model_id = r.model_id
"""

# What sql/roles.sql grants cxr_reviewer on top of the views as of this revision: the schema
# version (cxr-screen checks it before a query or a review) and the reviews identity sequence
# (to learn the id of the review just inserted, with currval).
REVIEWER_GRANTS = """\
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cxr_reviewer') THEN
        GRANT SELECT ON v_run_summary, v_reviews TO cxr_reviewer;
        GRANT SELECT ON alembic_version TO cxr_reviewer;
        EXECUTE format(
            'GRANT SELECT ON SEQUENCE %s TO cxr_reviewer',
            pg_get_serial_sequence('reviews', 'review_id')
        );
    END IF;
END
$grants$
"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    postgresql = _postgresql()
    if not postgresql:
        op.execute("DROP VIEW v_run_summary")
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("heartbeat_at", TIMESTAMP, server_default=NOW, nullable=False))
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_status"), sa.text(STATUSES))
    # Existing runs: their last known sign of life.
    op.execute("UPDATE runs SET heartbeat_at = COALESCE(finished_at, started_at)")
    if postgresql:
        op.execute(VIEWS["v_run_summary"].replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
    else:
        op.execute(VIEWS["v_run_summary"])
    op.execute(VIEWS["v_reviews"])
    if postgresql:
        op.execute(REVIEWER_GRANTS)


def downgrade() -> None:
    postgresql = _postgresql()
    op.execute("DROP VIEW v_reviews")
    op.execute("DROP VIEW v_run_summary")
    # The old schema has no 'abandoned': such runs become failed (their error says why).
    op.execute("UPDATE runs SET status = 'failed' WHERE status = 'abandoned'")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_status"), sa.text(PREVIOUS_STATUSES))
        batch.drop_column("heartbeat_at")
    op.execute(PREVIOUS_RUN_SUMMARY)
    if postgresql:
        op.execute(
            "DO $grants$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cxr_reviewer') "
            "THEN GRANT SELECT ON v_run_summary TO cxr_reviewer; END IF; END $grants$"
        )
