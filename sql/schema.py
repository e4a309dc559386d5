"""The results schema: one SQLAlchemy metadata for SQLite and PostgreSQL.

Keys are DICOM UIDs plus the model (one ``models`` row is one model version). All timestamps
are UTC: ``timestamptz`` on PostgreSQL, ISO text (``YYYY-MM-DD HH:MM:SS.ffffff``) on SQLite.
Patient identifiers are never stored: ``patient_id_hash`` holds a keyed hash (64 hex digits).

The migrations in ``sql/migrations`` create exactly this schema (``alembic check`` proves it);
change both together.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_KINDS = ("nightly", "reprocess", "train", "demo")
RUN_STATUSES = ("running", "completed", "failed", "abandoned", "interrupted")
OUTCOMES = ("predicted", "skipped", "failed")
DECISIONS = ("agree", "disagree", "uncertain")
AGGREGATIONS = ("max", "mean")
MANIFEST_STATUSES = ("pending", "running", "done", "failed")

# JSONB on PostgreSQL (comparable with IS DISTINCT FROM, indexable), JSON text on SQLite.
JSONType = postgresql.JSONB().with_variant(sa.JSON(), "sqlite")
# Text compares byte-wise on both databases: "C" collation on PostgreSQL (SQLite's BINARY is
# the same order). UIDs sort identically everywhere and key indexes avoid locale collation.
TextType = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")


class UtcDateTime(sa.TypeDecorator):
    """A timezone-aware UTC datetime on both databases.

    Binds: aware datetimes are converted to UTC, naive ones are rejected (their zone is
    unknown). Results: always aware UTC (SQLite gives back naive text, read as UTC).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__} {value!r}")
        if value.tzinfo is None:
            raise ValueError(
                f"datetime {value.isoformat()} has no time zone; pass an aware UTC value"
            )
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads it as a class attribute
        dt.datetime: UtcDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
        str: TextType,
        float: sa.Double(),
    }


class Model(Base):
    """One model version: a checkpoint file, identified by its sha256."""

    __tablename__ = "models"
    __table_args__ = (
        sa.UniqueConstraint("sha256"),
        sa.UniqueConstraint("name", "version"),
        sa.CheckConstraint("threshold >= 0 AND threshold <= 1", name="threshold_range"),
    )

    model_id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
    name: Mapped[str]
    version: Mapped[str]
    sha256: Mapped[str]
    format: Mapped[str | None]
    architecture: Mapped[str]
    arch_kwargs: Mapped[dict[str, Any]]
    class_names: Mapped[list[Any]]
    positive_class: Mapped[str]
    threshold: Mapped[float]
    input_size: Mapped[int]
    preprocessing: Mapped[dict[str, Any]]
    preprocessing_sha256: Mapped[str]
    metrics: Mapped[dict[str, Any]]
    provenance: Mapped[dict[str, Any]]
    notes: Mapped[str | None]
    checkpoint_metadata: Mapped[dict[str, Any]]  # the full metadata as registered
    created_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())


class Run(Base):
    """One pipeline run (nightly, reprocess, train, demo) and its outcome counts.

    ``status``: running, then completed, failed or interrupted (stopped by SIGINT or SIGTERM:
    its counts are those of the shards it committed); abandoned when it stopped giving signs
    of life (revision 0006 added ``interrupted``).

    ``heartbeat_at`` is the run's last sign of life: set when it starts and refreshed by every
    shard it commits (in the shard's transaction). A ``running`` run whose heartbeat is older
    than ``sql.runs.STALE_RUN_AFTER`` when another run starts is marked ``abandoned`` (its
    process was killed); a later heartbeat from it sets it back to ``running``.
    """

    __tablename__ = "runs"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", RUN_KINDS), name="kind"),
        sa.CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        sa.CheckConstraint(
            "files_seen >= 0 AND predicted >= 0 AND skipped >= 0 AND failed >= 0",
            name="counts_non_negative",
        ),
        sa.Index(None, "started_at"),
    )

    run_id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
    kind: Mapped[str]
    source: Mapped[str | None]
    parameters: Mapped[dict[str, Any]]
    selection_policy: Mapped[dict[str, Any]]
    model_id: Mapped[int | None] = mapped_column(sa.ForeignKey("models.model_id"), index=True)
    status: Mapped[str]
    files_seen: Mapped[int] = mapped_column(server_default="0")
    predicted: Mapped[int] = mapped_column(server_default="0")
    skipped: Mapped[int] = mapped_column(server_default="0")
    failed: Mapped[int] = mapped_column(server_default="0")
    started_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    prefect_flow_run_id: Mapped[str | None]
    error: Mapped[str | None]
    heartbeat_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())


class Study(Base):
    """Study-level header facts, from the first instance seen (missing facts filled later)."""

    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(primary_key=True)
    accession_number: Mapped[str | None] = mapped_column(index=True)
    study_date: Mapped[dt.date | None] = mapped_column(index=True)
    patient_id_hash: Mapped[str | None] = mapped_column(index=True)
    first_seen_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("runs.run_id"))
    created_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())


# The three per-file tables (instances, file_outcomes, image_predictions) carry no FOREIGN KEY
# constraints: on PostgreSQL each one is a trigger call per row (measured ~13-17 us/row, i.e.
# three of them more than double the cost of a 100k-row bulk upsert). The writers in
# sql/ check the references per call instead (the model and run exist; every prediction's
# instance is stored), and sql.integrity.check_integrity() audits the whole database for orphans.


class Instance(Base):
    """One SOP instance (image) with its header facts, the hash of its first file's bytes and
    its content fingerprints (revision 0006): ``pixel_fingerprint`` hashes the decoded native
    pixels and the attributes that give them their meaning, ``codestream_fingerprint`` the
    compressed frames and those attributes (files decoded at reduced resolution). A copy of the
    instance in another encoding has the same pixel fingerprint (see ``sql.shards``)."""

    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(index=True)
    series_instance_uid: Mapped[str | None]
    modality: Mapped[str | None]
    body_part: Mapped[str | None]
    view_position: Mapped[str | None]
    photometric_interpretation: Mapped[str | None]
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    bits_stored: Mapped[int | None]
    pixel_representation: Mapped[int | None]
    number_of_frames: Mapped[int | None]
    transfer_syntax_uid: Mapped[str | None]
    study_date: Mapped[dt.date | None]
    accession_number: Mapped[str | None]
    patient_id_hash: Mapped[str | None]
    # SHA-256 of the file's content: its bytes, native pixel data entering as its pixel
    # fingerprint (tasks.dicom.fingerprint.content_sha256; rows written before 2026-11-29
    # hold a plain SHA-256 of the file: comparing them falls through to the fingerprints)
    content_sha256: Mapped[str]
    source_uri: Mapped[str]  # where it was first seen
    first_seen_run_id: Mapped[int | None]  # references runs.run_id (checked by the writer)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())
    pixel_fingerprint: Mapped[str | None]  # 0006
    codestream_fingerprint: Mapped[str | None]  # 0006


class FileOutcome(Base):
    """What happened to one source file for one model version: predicted, skipped or failed."""

    __tablename__ = "file_outcomes"
    __table_args__ = (
        sa.CheckConstraint(_in("outcome", OUTCOMES), name="outcome"),
        sa.CheckConstraint("outcome = 'predicted' OR reason IS NOT NULL", name="reason_required"),
        sa.Index(None, "sop_instance_uid", "model_id"),
    )

    source_uri: Mapped[str] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(primary_key=True)  # references models.model_id
    sop_instance_uid: Mapped[str | None]
    study_instance_uid: Mapped[str | None] = mapped_column(index=True)
    content_sha256: Mapped[str | None]
    outcome: Mapped[str]
    reason: Mapped[str | None]
    facts: Mapped[dict[str, Any]]
    thumbnail_path: Mapped[str | None]
    run_id: Mapped[int] = mapped_column(index=True)  # references runs.run_id
    updated_at: Mapped[dt.datetime]
    pixel_fingerprint: Mapped[str | None]  # the file's content fingerprints (0006)
    codestream_fingerprint: Mapped[str | None]


class ImagePrediction(Base):
    """The positive-class probability of one image under one model version."""

    __tablename__ = "image_predictions"
    __table_args__ = (
        sa.CheckConstraint("score >= 0 AND score <= 1", name="score_range"),
        sa.Index(None, "study_instance_uid", "model_id"),
    )

    sop_instance_uid: Mapped[str] = mapped_column(primary_key=True)  # -> instances
    model_id: Mapped[int] = mapped_column(primary_key=True)  # -> models
    study_instance_uid: Mapped[str]
    score: Mapped[float]
    label: Mapped[bool]
    threshold: Mapped[float]
    preprocessing_sha256: Mapped[str]
    run_id: Mapped[int]  # -> runs
    predicted_at: Mapped[dt.datetime]


class StudyPrediction(Base):
    """One study's aggregated prediction under one model version."""

    __tablename__ = "study_predictions"
    __table_args__ = (
        sa.CheckConstraint(_in("aggregation", AGGREGATIONS), name="aggregation"),
        sa.CheckConstraint("score >= 0 AND score <= 1", name="score_range"),
        sa.CheckConstraint("n_images > 0", name="n_images_positive"),
        sa.Index(None, "model_id", "label", "score"),
        sa.Index(None, "label", "score"),  # the review worklist in score order (0004)
        sa.Index(None, "predicted_at"),
    )

    study_instance_uid: Mapped[str] = mapped_column(
        sa.ForeignKey("studies.study_instance_uid"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.model_id"), primary_key=True)
    aggregation: Mapped[str]
    n_images: Mapped[int]
    score: Mapped[float]
    label: Mapped[bool]
    threshold: Mapped[float]
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.run_id"), index=True)
    predicted_at: Mapped[dt.datetime]


class Review(Base):
    """A reviewer's decision on a study (append-only; the latest per study counts)."""

    __tablename__ = "reviews"
    __table_args__ = (
        sa.CheckConstraint(_in("decision", DECISIONS), name="decision"),
        sa.Index(None, "study_instance_uid", "created_at"),
    )

    review_id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(sa.ForeignKey("studies.study_instance_uid"))
    model_id: Mapped[int | None] = mapped_column(sa.ForeignKey("models.model_id"))
    decision: Mapped[str]
    reviewer: Mapped[str]
    note: Mapped[str | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())
    reason: Mapped[str | None]  # why a reviewer disagreed (one of a short list; 0004)


class UidConflict(Base):
    """A file whose SOP Instance UID was already stored with different content (not merged)."""

    __tablename__ = "uid_conflicts"
    __table_args__ = (
        sa.UniqueConstraint("sop_instance_uid", "new_source_uri", "new_content_sha256"),
    )

    conflict_id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
    sop_instance_uid: Mapped[str]
    existing_source_uri: Mapped[str]
    existing_content_sha256: Mapped[str]
    new_source_uri: Mapped[str]
    new_content_sha256: Mapped[str]
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.run_id"), index=True)
    detected_at: Mapped[dt.datetime]


class Watermark(Base):
    """A named high-water mark (e.g. what the last successful nightly run picked up)."""

    __tablename__ = "watermarks"

    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[dt.datetime]
    detail: Mapped[dict[str, Any]]
    run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("runs.run_id"))
    updated_at: Mapped[dt.datetime]


class ShardManifest(Base):
    """One shard of a fan-out job: the files one sub-flow run screens, and how far it got.

    A fan-out job (``job_key``: the parent flow run's id, or a key given to resume it) splits
    its sources into manifests of file records (where to re-open each file, never its bytes).
    A worker claims a manifest (``attempts`` + 1: the latest claim owns it), commits each
    chunk of files in the same transaction as the chunk's results (``files_done``, ``counts``,
    ``study_uids``), and marks it done. Written by ``sql.manifests``.
    """

    __tablename__ = "shard_manifests"
    __table_args__ = (
        sa.UniqueConstraint("job_key", "shard_index"),
        sa.CheckConstraint(_in("status", MANIFEST_STATUSES), name="status"),
        sa.CheckConstraint(
            "n_files >= 0 AND files_done >= 0 AND files_done <= n_files AND attempts >= 0",
            name="progress",
        ),
    )

    manifest_id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
    job_key: Mapped[str]
    shard_index: Mapped[int]
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.run_id"), index=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.model_id"))
    parameters: Mapped[dict[str, Any]]  # the job's settings every worker must apply alike
    files: Mapped[list[Any]]  # file records; emptied once the job is complete
    n_files: Mapped[int]
    files_sha256: Mapped[str]  # digest of the records: a re-planned job must match it
    status: Mapped[str]
    files_done: Mapped[int] = mapped_column(server_default="0")
    counts: Mapped[dict[str, Any]]  # predicted / skipped / failed so far
    study_uids: Mapped[list[Any]]  # studies with a prediction from this manifest
    attempts: Mapped[int] = mapped_column(server_default="0")
    worker: Mapped[str | None]  # who claimed it last (host and device slot)
    prefect_flow_run_id: Mapped[str | None]  # the sub-flow run that claimed it last
    error: Mapped[str | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[dt.datetime]


# -- the review web page (web/, revision 0004) -----------------------------------------------


class WebUser(Base):
    """A login of the review web page: its name (recorded as the reviewer of its decisions)
    and an argon2 hash of its password (``cxr-screen web adduser``). Read by the web page's
    login (the PostgreSQL ``cxr_reviewer`` role may read it, not change it)."""

    __tablename__ = "web_users"
    __table_args__ = (sa.UniqueConstraint("username"),)

    user_id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
    username: Mapped[str]
    password_hash: Mapped[str]
    active: Mapped[bool] = mapped_column(server_default=sa.true())
    created_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=sa.func.now())


# -- results back to the PACS (tasks/publish, revision 0005) -----------------------------------

PUBLICATION_STATUSES = ("sent", "failed")
PUBLICATION_PROTOCOLS = ("STOW-RS", "C-STORE")


class Publication(Base):
    """One attempt to send a study's result under one model version to a PACS, as a DICOM
    Structured Report: what was sent (the SR's UIDs and SOP class, the study result's version),
    where, when, and the PACS's answer. Append-only history; ``v_unpublished`` lists the study
    results that no successful attempt has sent yet (or whose result changed since).

    ``destination`` is the configured PACS's name and address, never its credentials.
    ``prediction_at`` is the ``study_predictions.predicted_at`` of the result that was sent.
    """

    __tablename__ = "publications"
    __table_args__ = (
        sa.CheckConstraint(_in("status", PUBLICATION_STATUSES), name="status"),
        sa.CheckConstraint(_in("protocol", PUBLICATION_PROTOCOLS), name="protocol"),
        sa.CheckConstraint("status = 'sent' OR error IS NOT NULL", name="error_required"),
        sa.Index(None, "study_instance_uid", "model_id"),
        sa.Index(None, "sent_at"),
    )

    publication_id: Mapped[int] = mapped_column(sa.Integer, sa.Identity(), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(sa.ForeignKey("studies.study_instance_uid"))
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.model_id"))
    destination: Mapped[str]
    protocol: Mapped[str]
    sr_sop_class_uid: Mapped[str]
    sr_series_instance_uid: Mapped[str]
    sr_sop_instance_uid: Mapped[str]
    prediction_at: Mapped[dt.datetime]
    score: Mapped[float]
    label: Mapped[bool]
    n_images: Mapped[int]
    status: Mapped[str]
    pacs_status: Mapped[str | None]  # "HTTP 200", "0x0000", ...
    pacs_answer: Mapped[dict[str, Any]]  # the PACS's answer, without patient data
    error: Mapped[str | None]
    sent_at: Mapped[dt.datetime]


class PacsPendingStudy(Base):
    """A study a PACS source found *partial* (fewer instances arrived than the PACS announced):
    its files were screened but the study was not aggregated, and the next run from that PACS
    asks for it again by UID (the row is deleted once a run finds it complete, or the PACS no
    longer has it). ``pacs`` is the configured PACS's name (never credentials); ``reason``
    says what was short, with counts (no patient data). Written by ``sql.pacs_studies``
    (revision 0007).
    """

    __tablename__ = "pacs_pending_studies"

    pacs: Mapped[str] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(primary_key=True)
    reason: Mapped[str]
    first_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("runs.run_id"))
    last_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("runs.run_id"))
    attempts: Mapped[int]
    updated_at: Mapped[dt.datetime]


metadata = Base.metadata
