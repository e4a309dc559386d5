"""Instance identity by content and interrupted runs: content fingerprints on instances and
file_outcomes, the 'interrupted' run status, and v_run_summary's text saying what it means.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

``instances.pixel_fingerprint`` / ``codestream_fingerprint`` identify an instance's content
(the decoded native pixels, or the compressed frames, with the attributes that give them their
meaning): a copy in another encoding is the same instance, not a UID conflict (sql.shards).
``file_outcomes`` records each file's fingerprints too. Rows from before this revision have
none; they are compared by their bytes' sha256 as before, and gain fingerprints when a copy
with the same bytes is screened again.

A run stopped by SIGINT or SIGTERM is closed as ``interrupted`` (sql.runs.interrupt_run).

VIEWS holds the frozen copy of sql/views/v_run_summary.sql as of this revision (its comment
lists the new status; its columns are unchanged). On SQLite the runs table is rebuilt (batch
mode: a CHECK constraint cannot be altered in place) with v_run_summary dropped around it, as
in 0003; on PostgreSQL the view is replaced in place, which keeps its grants.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
STATUSES = "status IN ('running', 'completed', 'failed', 'abandoned', 'interrupted')"
PREVIOUS_STATUSES = "status IN ('running', 'completed', 'failed', 'abandoned')"
FINGERPRINTS = ("pixel_fingerprint", "codestream_fingerprint")

# View name -> the CREATE VIEW statement as of this revision (frozen copies of sql/views/).
VIEWS: dict[str, str] = {
    "v_run_summary": """\
-- One row per run. For a completed run files_seen = predicted + skipped + failed.
-- status: running, completed, failed, interrupted (stopped by SIGINT or SIGTERM: its counts are
-- those of the shards it committed before it stopped; run the same command again to finish),
-- or abandoned (a run that stopped giving signs of life: its process was killed; error says
-- when and which run noticed). heartbeat_at: the run's last sign of life (its start, then
-- each committed shard).
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
}

# v_run_summary as revision 0003 created it (for the downgrade).
PREVIOUS_RUN_SUMMARY = """\
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
"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    for table in ("instances", "file_outcomes"):
        for column in FINGERPRINTS:
            op.add_column(table, sa.Column(column, TEXT, nullable=True))
    postgresql = _postgresql()
    if not postgresql:
        op.execute("DROP VIEW v_run_summary")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_status"), sa.text(STATUSES))
    if postgresql:
        op.execute(VIEWS["v_run_summary"].replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
    else:
        op.execute(VIEWS["v_run_summary"])


def downgrade() -> None:
    postgresql = _postgresql()
    if not postgresql:
        op.execute("DROP VIEW v_run_summary")
    # The old schema has no 'interrupted': such runs become failed (their error says why).
    op.execute("UPDATE runs SET status = 'failed' WHERE status = 'interrupted'")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_status"), sa.text(PREVIOUS_STATUSES))
    if postgresql:
        op.execute(PREVIOUS_RUN_SUMMARY.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
    else:
        op.execute(PREVIOUS_RUN_SUMMARY)
    # A plain DROP COLUMN (SQLite 3.35+): a batch rebuild would break the views that read
    # these tables, and none of them reads the fingerprints.
    for table in ("file_outcomes", "instances"):
        for column in reversed(FINGERPRINTS):
            op.drop_column(table, column)
