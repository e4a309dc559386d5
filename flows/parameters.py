"""The options of the flows with many parameters, as pydantic models.

A flow takes what it works on as plain parameters (``sources``, ``model``; ``data``, ``out``)
and how as one of these models (``params``): Prefect renders a model as a form in its UI and
validates a deployment run's values against it, and the CLI builds one from its options. Every
field has a default; None means "from the settings" (``flows/settings.py``: the environment of
the process that runs the flow), for the fields where the settings have a value.

No secret is ever a field: Prefect stores flow parameters and shows them to anyone with access
to its UI or API. The results database URL, the HMAC key and the like come from the settings.
This module imports pydantic only, so that the CLI can build parameters before Prefect loads.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

MAX_IN_FLIGHT_CAP = 64  # threads of the fan-out parent's task runner

Aggregation = Literal["max", "mean"]
ScreenKind = Literal["reprocess", "nightly", "demo"]
SCREEN_KINDS: tuple[str, ...] = get_args(ScreenKind)  # the run kinds of a screening run


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScreenParameters(_Parameters):
    """How to screen (``screen`` flow)."""

    force: bool = Field(False, description="Recompute what this model version already predicted")
    shard_size: int | None = Field(None, ge=1, description="Files per shard (default: settings)")
    workers: int | None = Field(
        None, ge=0, description="Decode processes (0: in the flow's process; default: settings)"
    )
    batch_size: int | None = Field(None, ge=1, description="Inference batch size")
    device: str | None = Field(None, description="auto, cpu or cuda (default: settings)")
    reduced: bool = Field(True, description="Decode at reduced resolution where the codec can")
    kind: ScreenKind = Field("reprocess", description="Run kind recorded with the run")
    aggregation: Aggregation = Field("max", description="Study score from its images' scores")
    newer_than: float | None = Field(
        None, description="Only files that arrived after this POSIX time (the nightly run's)"
    )
    selection: dict[str, Any] | None = Field(
        None,
        description="Selection policy fields (tasks/dicom/selection.py); default: CR/DX "
        "chest PA/AP",
    )
    # PACS sources (pacs://NAME, dicomweb+https://..., dimse://AET@host:port): which studies.
    # A source names a PACS, never its credentials (tasks/dicom/pacs/config.py refuses them).
    study_date: str | None = Field(
        None,
        description="PACS sources: studies of this date or range (2026-11-28, "
        "2026-11-01..2026-11-28)",
    )
    since: str | None = Field(
        None, description="PACS sources: studies from this date (YYYY-MM-DD) to today"
    )
    study_uids: list[str] = Field(
        default_factory=list,
        description="PACS sources: these Study Instance UIDs as well (the studies a run found "
        "partial are added by the flow)",
    )
    connections: int | None = Field(
        None, ge=1, le=64, description="PACS sources: parallel connections or associations"
    )


class TrainParameters(_Parameters):
    """How to train (``train`` flow)."""

    epochs: int = Field(30, ge=1, description="Maximum epochs")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW, cosine)")
    architecture: str = "lg_mobilenet_v2"
    input_size: int = Field(150, ge=32)
    version: str | None = Field(
        None, description="Model version (default: UTC date-time + weights hash)"
    )
    name: str = Field("cxr-screen", description="Model name")
    notes: str = Field("", description="Free text stored in the checkpoint")
    seed: int = 0
    target_sensitivity: float = Field(0.95, gt=0, le=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    device: str | None = Field(None, description="auto, cpu or cuda (default: settings)")
    workers: int | None = Field(
        None, ge=0, description="Decode processes (0: in the flow's process; default: cores)"
    )
    positive_class: str | None = Field(
        None, description="Default: 'positive' or 'abnormal', else the last class"
    )
    patience: int = Field(6, ge=1, description="Epochs without improvement before stopping")
    augment: bool = True
    reduced: bool = Field(True, description="Decode at reduced resolution where the codec can")
    selection: dict[str, Any] | None = Field(None, description="Selection policy fields")


class FanoutParameters(_Parameters):
    """How to fan a reprocessing job out across the workers (``screen-fanout`` flow)."""

    force: bool = Field(False, description="Recompute what this model version already predicted")
    manifest_size: int | None = Field(
        None,
        ge=1,
        description="Files per shard manifest, one sub-flow run each (default: settings)",
    )
    shard_size: int | None = Field(None, ge=1, description="Files per committed chunk")
    max_in_flight: int = Field(8, ge=1, le=MAX_IN_FLIGHT_CAP, description="Shards at once")
    shard_attempts: int = Field(3, ge=1, description="Launches of a shard before giving up")
    shard_timeout_s: float | None = Field(
        None, gt=0, description="Seconds before a shard's run is cancelled and launched again"
    )
    aggregation: Aggregation = "max"
    reduced: bool = True
    selection: dict[str, Any] | None = None
    spool_dir: str | None = Field(
        None, description="Shared folder for .tar.gz members (default: settings)"
    )
    job_key: str | None = Field(
        None, description="Resume the job with this key (default: the flow run's id)"
    )
    deployment: str = Field("screen-shard/shard", description="The shard deployment")
    poll_s: float = Field(5.0, gt=0, description="Seconds between looks at a shard's run")
