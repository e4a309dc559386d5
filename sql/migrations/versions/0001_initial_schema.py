"""Initial schema: models, runs, studies, instances, file outcomes, predictions, reviews,
UID conflicts, watermarks and the contract views.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

VIEWS holds frozen copies of sql/views/*.sql as of this revision: a later change to a view
file needs a new revision that carries the new SQL (tests/sql/test_migrations.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = postgresql.JSONB().with_variant(sa.JSON(), "sqlite")
TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
NOW = sa.text("CURRENT_TIMESTAMP")

# View name -> the CREATE VIEW statement as of this revision (frozen copies of sql/views/).
VIEWS: dict[str, str] = {
    "v_study_results": """\
-- One row per study and model version: the study's aggregated prediction.
-- Contract columns (scripts rely on them): study_instance_uid, accession_number, study_date,
-- model_name, model_version, score, label, threshold, n_images, run_id, predicted_at.
CREATE VIEW v_study_results AS
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
    sp.run_id,
    sp.predicted_at,
    sp.aggregation,
    sp.model_id
FROM study_predictions AS sp
JOIN studies AS st ON st.study_instance_uid = sp.study_instance_uid
JOIN models AS m ON m.model_id = sp.model_id
""",
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
    "v_review_queue": """\
-- Studies waiting for a reviewer: the study's latest prediction (the most recent of any model
-- version) is positive and nobody has reviewed the study yet. Highest score first. The
-- thumbnail is that of the study's highest-scoring image under that model version.
CREATE VIEW v_review_queue AS
SELECT
    latest.study_instance_uid,
    st.accession_number,
    st.study_date,
    m.name AS model_name,
    m.version AS model_version,
    latest.score,
    latest.threshold,
    latest.n_images,
    (
        SELECT fo.thumbnail_path
        FROM image_predictions AS ip
        JOIN file_outcomes AS fo
            ON fo.sop_instance_uid = ip.sop_instance_uid AND fo.model_id = ip.model_id
        WHERE ip.study_instance_uid = latest.study_instance_uid
            AND ip.model_id = latest.model_id
            AND fo.outcome = 'predicted'
            AND fo.thumbnail_path IS NOT NULL
        ORDER BY ip.score DESC, fo.source_uri
        LIMIT 1
    ) AS thumbnail_path,
    latest.run_id,
    latest.predicted_at,
    latest.model_id
FROM (
    SELECT
        sp.study_instance_uid,
        sp.model_id,
        sp.score,
        sp.label,
        sp.threshold,
        sp.n_images,
        sp.run_id,
        sp.predicted_at,
        ROW_NUMBER() OVER (
            PARTITION BY sp.study_instance_uid
            ORDER BY sp.predicted_at DESC, sp.model_id DESC
        ) AS recency
    FROM study_predictions AS sp
) AS latest
JOIN studies AS st ON st.study_instance_uid = latest.study_instance_uid
JOIN models AS m ON m.model_id = latest.model_id
WHERE latest.recency = 1
    AND latest.label = TRUE
    AND NOT EXISTS (
        SELECT 1 FROM reviews AS r WHERE r.study_instance_uid = latest.study_instance_uid
    )
ORDER BY latest.score DESC, latest.study_instance_uid
""",
    "v_run_summary": """\
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
""",
    "v_skip_reasons": """\
-- Why files were not predicted: one row per outcome (skipped | failed), reason and model
-- version, with the number of files and when such a file was last written.
CREATE VIEW v_skip_reasons AS
SELECT
    fo.outcome,
    fo.reason,
    m.name AS model_name,
    m.version AS model_version,
    fo.model_id,
    COUNT(*) AS n_files,
    MAX(fo.updated_at) AS last_updated_at
FROM file_outcomes AS fo
JOIN models AS m ON m.model_id = fo.model_id
WHERE fo.outcome <> 'predicted'
GROUP BY fo.outcome, fo.reason, m.name, m.version, fo.model_id
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
}


def _id(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), sa.Identity(always=False), nullable=False)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    ref_table = target.split(".")[0]
    return sa.ForeignKeyConstraint(
        [column], [target], name=op.f(f"fk_{table}_{column}_{ref_table}")
    )


def _index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def upgrade() -> None:
    # instances, file_outcomes and image_predictions have no FOREIGN KEYs on purpose (bulk
    # speed); the writers check references per call and check_integrity() audits them.
    op.create_table(
        "models",
        _id("model_id"),
        sa.Column("name", TEXT, nullable=False),
        sa.Column("version", TEXT, nullable=False),
        sa.Column("sha256", TEXT, nullable=False),
        sa.Column("format", TEXT, nullable=True),
        sa.Column("architecture", TEXT, nullable=False),
        sa.Column("arch_kwargs", JSON, nullable=False),
        sa.Column("class_names", JSON, nullable=False),
        sa.Column("positive_class", TEXT, nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("input_size", sa.Integer(), nullable=False),
        sa.Column("preprocessing", JSON, nullable=False),
        sa.Column("preprocessing_sha256", TEXT, nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("provenance", JSON, nullable=False),
        sa.Column("notes", TEXT, nullable=True),
        sa.Column("checkpoint_metadata", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, server_default=NOW, nullable=False),
        sa.CheckConstraint(
            "threshold >= 0 AND threshold <= 1", name=op.f("ck_models_threshold_range")
        ),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_models_name_version")),
        sa.UniqueConstraint("sha256", name=op.f("uq_models_sha256")),
    )
    op.create_table(
        "runs",
        _id("run_id"),
        sa.Column("kind", TEXT, nullable=False),
        sa.Column("source", TEXT, nullable=True),
        sa.Column("parameters", JSON, nullable=False),
        sa.Column("selection_policy", JSON, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("status", TEXT, nullable=False),
        sa.Column("files_seen", sa.Integer(), server_default="0", nullable=False),
        sa.Column("predicted", sa.Integer(), server_default="0", nullable=False),
        sa.Column("skipped", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("prefect_flow_run_id", TEXT, nullable=True),
        sa.Column("error", TEXT, nullable=True),
        sa.CheckConstraint(
            "kind IN ('nightly', 'reprocess', 'train', 'demo')", name=op.f("ck_runs_kind")
        ),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'failed')", name=op.f("ck_runs_status")
        ),
        sa.CheckConstraint(
            "files_seen >= 0 AND predicted >= 0 AND skipped >= 0 AND failed >= 0",
            name=op.f("ck_runs_counts_non_negative"),
        ),
        _fk("runs", "model_id", "models.model_id"),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
    )
    _index("runs", "model_id")
    _index("runs", "started_at")

    op.create_table(
        "studies",
        sa.Column("study_instance_uid", TEXT, nullable=False),
        sa.Column("accession_number", TEXT, nullable=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("patient_id_hash", TEXT, nullable=True),
        sa.Column("first_seen_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, server_default=NOW, nullable=False),
        _fk("studies", "first_seen_run_id", "runs.run_id"),
        sa.PrimaryKeyConstraint("study_instance_uid", name=op.f("pk_studies")),
    )
    _index("studies", "accession_number")
    _index("studies", "patient_id_hash")
    _index("studies", "study_date")

    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", TEXT, nullable=False),
        sa.Column("study_instance_uid", TEXT, nullable=False),
        sa.Column("series_instance_uid", TEXT, nullable=True),
        sa.Column("modality", TEXT, nullable=True),
        sa.Column("body_part", TEXT, nullable=True),
        sa.Column("view_position", TEXT, nullable=True),
        sa.Column("photometric_interpretation", TEXT, nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("bits_stored", sa.Integer(), nullable=True),
        sa.Column("pixel_representation", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", TEXT, nullable=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("accession_number", TEXT, nullable=True),
        sa.Column("patient_id_hash", TEXT, nullable=True),
        sa.Column("content_sha256", TEXT, nullable=False),
        sa.Column("source_uri", TEXT, nullable=False),
        sa.Column("first_seen_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_instances")),
    )
    _index("instances", "study_instance_uid")

    op.create_table(
        "file_outcomes",
        sa.Column("source_uri", TEXT, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", TEXT, nullable=True),
        sa.Column("study_instance_uid", TEXT, nullable=True),
        sa.Column("content_sha256", TEXT, nullable=True),
        sa.Column("outcome", TEXT, nullable=False),
        sa.Column("reason", TEXT, nullable=True),
        sa.Column("facts", JSON, nullable=False),
        sa.Column("thumbnail_path", TEXT, nullable=True),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "outcome = 'predicted' OR reason IS NOT NULL",
            name=op.f("ck_file_outcomes_reason_required"),
        ),
        sa.CheckConstraint(
            "outcome IN ('predicted', 'skipped', 'failed')", name=op.f("ck_file_outcomes_outcome")
        ),
        sa.PrimaryKeyConstraint("source_uri", "model_id", name=op.f("pk_file_outcomes")),
    )
    _index("file_outcomes", "run_id")
    _index("file_outcomes", "sop_instance_uid", "model_id")
    _index("file_outcomes", "study_instance_uid")

    op.create_table(
        "image_predictions",
        sa.Column("sop_instance_uid", TEXT, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", TEXT, nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("label", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("preprocessing_sha256", TEXT, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("predicted_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "score >= 0 AND score <= 1", name=op.f("ck_image_predictions_score_range")
        ),
        sa.PrimaryKeyConstraint("sop_instance_uid", "model_id", name=op.f("pk_image_predictions")),
    )
    _index("image_predictions", "study_instance_uid", "model_id")

    op.create_table(
        "study_predictions",
        sa.Column("study_instance_uid", TEXT, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("aggregation", TEXT, nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("label", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("predicted_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "aggregation IN ('max', 'mean')", name=op.f("ck_study_predictions_aggregation")
        ),
        sa.CheckConstraint("n_images > 0", name=op.f("ck_study_predictions_n_images_positive")),
        sa.CheckConstraint(
            "score >= 0 AND score <= 1", name=op.f("ck_study_predictions_score_range")
        ),
        _fk("study_predictions", "model_id", "models.model_id"),
        _fk("study_predictions", "run_id", "runs.run_id"),
        _fk("study_predictions", "study_instance_uid", "studies.study_instance_uid"),
        sa.PrimaryKeyConstraint(
            "study_instance_uid", "model_id", name=op.f("pk_study_predictions")
        ),
    )
    _index("study_predictions", "model_id", "label", "score")
    _index("study_predictions", "predicted_at")
    _index("study_predictions", "run_id")

    op.create_table(
        "reviews",
        _id("review_id"),
        sa.Column("study_instance_uid", TEXT, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("decision", TEXT, nullable=False),
        sa.Column("reviewer", TEXT, nullable=False),
        sa.Column("note", TEXT, nullable=True),
        sa.Column("created_at", TIMESTAMP, server_default=NOW, nullable=False),
        sa.CheckConstraint(
            "decision IN ('agree', 'disagree', 'uncertain')", name=op.f("ck_reviews_decision")
        ),
        _fk("reviews", "model_id", "models.model_id"),
        _fk("reviews", "study_instance_uid", "studies.study_instance_uid"),
        sa.PrimaryKeyConstraint("review_id", name=op.f("pk_reviews")),
    )
    _index("reviews", "study_instance_uid", "created_at")

    op.create_table(
        "uid_conflicts",
        _id("conflict_id"),
        sa.Column("sop_instance_uid", TEXT, nullable=False),
        sa.Column("existing_source_uri", TEXT, nullable=False),
        sa.Column("existing_content_sha256", TEXT, nullable=False),
        sa.Column("new_source_uri", TEXT, nullable=False),
        sa.Column("new_content_sha256", TEXT, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("detected_at", TIMESTAMP, nullable=False),
        _fk("uid_conflicts", "run_id", "runs.run_id"),
        sa.PrimaryKeyConstraint("conflict_id", name=op.f("pk_uid_conflicts")),
        sa.UniqueConstraint(
            "sop_instance_uid",
            "new_source_uri",
            "new_content_sha256",
            name=op.f("uq_uid_conflicts_sop_instance_uid_new_source_uri_new_content_sha256"),
        ),
    )
    _index("uid_conflicts", "run_id")

    op.create_table(
        "watermarks",
        sa.Column("name", TEXT, nullable=False),
        sa.Column("value", TIMESTAMP, nullable=False),
        sa.Column("detail", JSON, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        _fk("watermarks", "run_id", "runs.run_id"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_watermarks")),
    )

    for sql in VIEWS.values():
        op.execute(sql)


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for table in (
        "watermarks",
        "uid_conflicts",
        "reviews",
        "study_predictions",
        "image_predictions",
        "file_outcomes",
        "instances",
        "studies",
        "runs",
        "models",
    ):
        op.drop_table(table)
