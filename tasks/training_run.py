"""A training run's bookkeeping: the checkpoint, its provenance, the database records, the report.

Plain functions (no Prefect): ``flows/train.py`` composes them through the thin tasks in
``tasks/prefect_tasks_train.py``. The database functions take the run's engine from the caller.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch
from sqlalchemy.engine import Engine

from model.checkpoint import Checkpoint
from model.training import TrainResult
from sql import runs
from sql.db import session_factory
from sql.schema import Model
from tasks.training_data import TrainingData

REPO_ROOT = Path(__file__).resolve().parent.parent


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of the weights alone (names, shapes, dtypes and values), in key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_version(state_dict: Mapping[str, torch.Tensor], when: dt.datetime) -> str:
    """``YYYYMMDD.HHMMSS-<8 hex of the weights' hash>`` (UTC): sorts by time, names the weights."""
    return f"{when.astimezone(dt.UTC):%Y%m%d.%H%M%S}-{weights_sha256(state_dict)[:8]}"


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """The code's git commit (with ``+dirty`` when there are uncommitted changes), if any."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def make_checkpoint(
    result: TrainResult,
    data: TrainingData,
    *,
    architecture: str,
    arch_kwargs: dict[str, Any],
    name: str,
    version: str | None,
    notes: str,
    started_at: dt.datetime,
    reduced: bool,
    selection_policy: Mapping[str, Any],
) -> Checkpoint:
    """The checkpoint of a finished training: weights, threshold, spec, provenance, metrics."""
    finished = dt.datetime.now(dt.UTC)
    provenance = {
        "data_source": data.report.source,
        "data_layout": data.report.layout,
        "files_seen": data.report.files_seen,
        "files_used": data.report.used,
        "files_skipped": data.report.skipped,
        "files_failed": data.report.failed,
        "per_class": dict(data.report.per_class),
        "per_split": {k: dict(v) for k, v in data.report.per_split.items()},
        "studies_per_split": dict(data.report.studies_per_split),
        "split": "by study and patient, stratified by class",
        "val_fraction": data.report.val_fraction,
        "seed": result.config.get("seed"),
        "config": dict(result.config),
        "reduced_resolution_decode": reduced,
        "selection_policy": dict(selection_policy),
        "git_commit": git_commit(),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "started_at": started_at.isoformat(),
        "trained_at": finished.isoformat(),
    }
    return Checkpoint(
        architecture=architecture,
        arch_kwargs=dict(arch_kwargs),
        class_names=list(data.class_names),
        positive_class=data.positive_class,
        threshold=float(result.threshold),
        preprocessing=data.spec,
        version=version or default_version(result.state_dict, finished),
        state_dict=result.state_dict,
        name=name,
        provenance=_plain(provenance),
        metrics=_plain({**result.metrics(), "history": _json_rows(result.history)}),
        notes=notes,
    )


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON types only (str subclasses, tuples and numpy scalars would make the
    checkpoint unloadable with ``weights_only=True``)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    return str(value)


def _json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History rows with NaN (an undefined AUROC) as None, so they stay valid JSON."""
    return [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in rows
    ]


def check_database(engine: Engine, name: str, version: str | None) -> None:
    """Refuse a name and version that is already registered before training: finding out
    after an hour of training would be worse."""
    if version is None:
        return
    models = Model.__table__
    with session_factory(engine, read_only=True)() as session:
        sha = session.execute(
            sa.select(models.c.sha256).where(models.c.name == name, models.c.version == version)
        ).scalar_one_or_none()
    if sha is not None:
        raise ValueError(
            f"model {name!r} version {version!r} is already registered (checkpoint sha256 "
            f"{sha}); choose another --version or leave it out for a date-based one"
        )


def record_training(
    engine: Engine,
    checkpoint: Checkpoint | None,
    *,
    counts: Mapping[str, int] | None,
    started_at: dt.datetime,
    parameters: Mapping[str, Any],
    selection_policy: Mapping[str, Any],
    source: str,
    prefect_flow_run_id: str | None = None,
    error: str | None = None,
) -> tuple[int | None, int]:
    """Record a ``train`` run, in one transaction; returns ``(model_id, run_id)``.

    With a checkpoint, the training succeeded: the saved checkpoint is registered as a model
    version and the run is recorded as completed, naming it. The run row is written once
    training has produced the model (with the run's real start time) for that reason.
    Without one, the run is recorded as failed with ``error`` (truncated to 2000 characters)
    and no model version (``model_id`` is None); ``counts`` may then be None (nothing seen).
    """
    if checkpoint is not None and not checkpoint.sha256:
        raise ValueError("the checkpoint must be saved (it has no sha256 yet) before registering")
    if (checkpoint is None) == (error is None):
        raise ValueError("give either a checkpoint (a completed run) or an error (a failed one)")
    zero = {"files_seen": 0, "predicted": 0, "skipped": 0, "failed": 0}
    with session_factory(engine).begin() as session:
        model_id = (
            None
            if checkpoint is None
            else runs.register_model(session, checkpoint.metadata(), checkpoint.sha256)
        )
        run_id = runs.start_run(
            session,
            kind="train",
            source=source,
            parameters=dict(parameters),
            selection_policy=dict(selection_policy),
            model_id=model_id,
            prefect_flow_run_id=prefect_flow_run_id,
            started_at=started_at,
        )
        if error is None:
            runs.finish_run(session, run_id, "completed", dict(counts or zero))
        else:
            runs.finish_run(session, run_id, "failed", dict(counts or zero), error[:2000])
    return model_id, run_id


def record_failed_training(engine: Engine, *, error: str, **run: Any) -> int:
    """Record a ``train`` run that failed (no model version), with its error; returns run_id.

    ``run``: the keyword arguments of ``record_training`` but the checkpoint."""
    return record_training(engine, None, error=error, **run)[1]


def training_summary(
    checkpoint: Checkpoint,
    data: TrainingData,
    result: TrainResult,
    *,
    out: str,
    sha256: str,
    model_id: int | None,
    run_id: int,
) -> dict[str, Any]:
    """What the ``train`` flow returns: the checkpoint, its registration and its metrics."""
    v = result.validation
    return {
        "run_id": run_id,
        "model_id": model_id,
        "checkpoint": out,
        "sha256": sha256,
        "name": checkpoint.name,
        "version": checkpoint.version,
        "class_names": checkpoint.class_names,
        "positive_class": checkpoint.positive_class,
        "threshold": checkpoint.threshold,
        "auroc": v.auroc,
        "sensitivity": v.sensitivity,
        "specificity": v.specificity,
        "confusion": {"tp": v.tp, "fp": v.fp, "tn": v.tn, "fn": v.fn},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_seconds": round(result.seconds, 1),
        "dataset": data.report.to_dict(),
    }


def history_rows(result: TrainResult) -> list[dict[str, Any]]:
    """The per-epoch history, floats rounded (for a table artifact)."""
    return [
        {k: (round(x, 5) if isinstance(x, float) else x) for k, x in row.items()}
        for row in result.history
    ]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def evaluation_markdown(checkpoint: Checkpoint, data: TrainingData, result: TrainResult) -> str:
    """The evaluation report (validation set) as Markdown, for a Prefect artifact."""
    v = result.validation
    pos, names = checkpoint.positive_class, checkpoint.class_names
    neg = " + ".join(n for n in names if n != pos)
    report = data.report
    lines = [
        f"# Training report: {checkpoint.name} {checkpoint.version}",
        "",
        f"Validation set: {v.n} images from {report.studies_per_split.get('validation', 0)} "
        f"studies (no study or patient also in training). Positive class: **{pos}**.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUROC | {_fmt(v.auroc)} |",
        f"| threshold (target sensitivity {_fmt(result.config.get('target_sensitivity'), 2)})"
        f" | {_fmt(v.threshold, 4)} |",
        f"| sensitivity at threshold | {_fmt(v.sensitivity)} |",
        f"| specificity at threshold | {_fmt(v.specificity)} |",
        f"| best epoch | {result.best_epoch} of {len(result.history)} run |",
        f"| training time | {result.seconds:.1f} s |",
        "",
        "## Confusion matrix (validation, at the threshold)",
        "",
        f"| true \\ predicted | {pos} | {neg} |",
        "|---|---|---|",
        f"| {pos} | {v.tp} (TP) | {v.fn} (FN) |",
        f"| {neg} | {v.fp} (FP) | {v.tn} (TN) |",
        "",
        "## Data",
        "",
        "| split | " + " | ".join(names) + " | studies |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for split in ("train", "validation"):
        counts = report.per_split.get(split, {})
        lines.append(
            f"| {split} | "
            + " | ".join(str(counts.get(n, 0)) for n in names)
            + f" | {report.studies_per_split.get(split, 0)} |"
        )
    lines += [
        "",
        f"Files seen {report.files_seen}: used {report.used}, skipped {report.skipped}, "
        f"failed {report.failed}.",
    ]
    if report.reasons:
        lines += ["", "| reason skipped or failed | files |", "|---|---|"]
        for reason, n in report.reasons.most_common(10):
            lines.append(f"| {reason.replace('|', '/')} | {n} |")
    lines += [
        "",
        "## History",
        "",
        "| epoch | train loss | validation AUROC | learning rate |",
        "|---|---|---|---|",
    ]
    for row in result.history:
        lines.append(
            f"| {row['epoch']} | {_fmt(row['train_loss'], 4)} | {_fmt(row['val_auroc'])} "
            f"| {row['lr']:.2e} |"
        )
    if checkpoint.notes:
        lines += ["", f"Notes: {checkpoint.notes}"]
    return "\n".join(lines) + "\n"
