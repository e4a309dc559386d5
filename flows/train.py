"""The ``train`` flow: labelled DICOM studies in, a registered checkpoint and its report out.

dataset (the screening pipeline's scan, selection and pixel path) → training loop → checkpoint
(class names, threshold chosen on validation, spec, version, provenance, metrics) → saved →
registered as a model version, with a ``train`` run → evaluation report artifact.

The ``cxr-screen train`` command is ``cli.demo.train_command`` (a module that imports Prefect
only when a command runs).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.errors import UserError
from flows.progress import report
from flows.settings import get_settings
from model.spec import PreprocessSpec
from model.training import TrainConfig
from tasks import prefect_tasks_train as t
from tasks.dicom.selection import SelectionPolicy
from tasks.screening import available_cores
from tasks.training_run import evaluation_markdown, make_checkpoint


class TrainError(UserError):
    """A fatal problem with the training run itself (data missing, output not writable)."""


@flow(
    name="train",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
    description="Train a checkpoint on labelled DICOM studies and register it as a model version.",
)
def train(
    data: str,
    out: str,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 3e-3,
    architecture: str = "lg_mobilenet_v2",
    input_size: int = 150,
    version: str | None = None,
    name: str = "cxr-screen",
    notes: str = "",
    database_url: str | None = None,
    seed: int = 0,
    target_sensitivity: float = 0.95,
    val_fraction: float = 0.2,
    device: str | None = None,
    workers: int | None = None,
    positive_class: str | None = None,
    patience: int = 6,
    augment: bool = True,
    reduced: bool = True,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Dataset → training → checkpoint → database (model version + ``train`` run) → report.

    ``data``: a folder with one sub-folder per class, or a CSV of ``path,label`` (paths relative
    to the CSV). Returns a summary: the checkpoint's path, sha256, version and metrics, the
    model_id and run_id in the database, and the dataset counts.
    """
    logger = get_run_logger()
    started_at = dt.datetime.now(dt.UTC)
    settings = get_settings(database_url=database_url, device=device, workers=workers)
    if not Path(data).exists():
        raise TrainError(f"training data does not exist: {data}")
    out_path = Path(out)
    if out_path.is_dir():
        raise TrainError(f"--out {out} is a directory; give the checkpoint's file name")
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        target_sensitivity=target_sensitivity,
        augment=augment,
        seed=seed,
        device=settings.device,
    )
    spec = PreprocessSpec(input_size=input_size)
    policy = SelectionPolicy.from_dict(selection) if selection else SelectionPolicy()
    # the data set is decoded before training starts: every core decodes
    n_workers = available_cores() if settings.workers is None else settings.workers
    parameters = {
        "data": data,
        "out": out,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "architecture": architecture,
        "input_size": input_size,
        "version": version,
        "name": name,
        "seed": seed,
        "target_sensitivity": target_sensitivity,
        "val_fraction": val_fraction,
        "device": settings.device,
        "workers": n_workers,
        "positive_class": positive_class,
        "patience": patience,
        "augment": augment,
        "reduced": reduced,
    }
    run_record = {
        "started_at": started_at,
        "parameters": parameters,
        "selection_policy": policy.to_dict(),
        "source": data,
        "prefect_flow_run_id": str(flow_run.id) if flow_run.id else None,
    }
    t.check_database(settings.database_url, name, version)
    report("train-start", epochs=epochs, data=data)
    dataset = None
    try:
        dataset = t.build_dataset(
            data,
            spec,
            hmac_key=settings.hmac_secret(),
            policy=policy,
            positive_class=positive_class,
            val_fraction=val_fraction,
            seed=seed,
            workers=n_workers,
            reduced=reduced,
            on_progress=lambda stage, done, total: report(
                "train-data", stage=stage, done=done, total=total
            ),
        )
        rep = dataset.report
        logger.info(
            "dataset: %d files seen, %d used, %d skipped, %d failed; train %s, validation %s",
            rep.files_seen,
            rep.used,
            rep.skipped,
            rep.failed,
            rep.per_split["train"],
            rep.per_split["validation"],
        )
        report("train-dataset", **rep.to_dict())
        config.positive_index = dataset.class_names.index(dataset.positive_class)
        arch_kwargs = {"num_classes": len(dataset.class_names)}
        result = t.fit(
            architecture,
            arch_kwargs,
            dataset,
            config,
            on_epoch=lambda row: report("train-epoch", epochs=epochs, **row),
        )
        checkpoint = make_checkpoint(
            result,
            dataset,
            architecture=architecture,
            arch_kwargs=arch_kwargs,
            name=name,
            version=version,
            notes=notes,
            started_at=started_at,
            reduced=reduced,
            selection_policy=policy.to_dict(),
        )
        sha256 = t.save_checkpoint(checkpoint, str(out_path))
        model_id, run_id = t.record_training(
            settings.database_url, checkpoint, counts=rep.run_counts(), **run_record
        )
    except BaseException as exc:
        counts = dataset.report.run_counts() if dataset is not None else None
        try:
            t.record_failed_training(
                settings.database_url,
                error=f"{type(exc).__name__}: {exc}",
                counts=counts,
                **run_record,
            )
        except Exception as db_exc:  # keep the original error: it is the one that matters
            logger.warning("could not record the failed training run: %s", db_exc)
        raise

    v = result.validation
    create_markdown_artifact(
        evaluation_markdown(checkpoint, dataset, result),
        key="train-evaluation",
        description=f"Validation report of {name} {checkpoint.version} (run {run_id})",
    )
    create_table_artifact(
        [
            {k: (round(x, 5) if isinstance(x, float) else x) for k, x in row.items()}
            for row in result.history
        ],
        key="train-history",
        description=f"Per-epoch history of {name} {checkpoint.version}",
    )
    summary = {
        "run_id": run_id,
        "model_id": model_id,
        "checkpoint": str(out_path),
        "sha256": sha256,
        "name": name,
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
        "dataset": rep.to_dict(),
    }
    report("train-done", **summary)
    return summary
