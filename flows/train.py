"""The ``train`` flow: labelled DICOM studies in, a registered checkpoint and its report out.

dataset (the screening pipeline's scan, selection and pixel path) → training loop → checkpoint
(class names, threshold chosen on validation, spec, version, provenance, metrics) → saved →
registered as a model version, with a ``train`` run → evaluation report artifact.

The flow composes the tasks of ``tasks/prefect_tasks_train.py``; the run opens its results
database once (the URL from the settings, never a parameter) and passes the engine down.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from sqlalchemy.engine import Engine

from flows.errors import UserError
from flows.parameters import TrainParameters
from flows.progress import report
from flows.settings import get_settings
from model.spec import PreprocessSpec
from model.training import TrainConfig
from tasks import prefect_tasks_train as t
from tasks.decode_pool import available_cores
from tasks.dicom.selection import SelectionPolicy
from tasks.prefect_tasks import database
from tasks.training_data import DatasetReport, TrainingData
from tasks.training_run import (
    evaluation_markdown,
    history_rows,
    make_checkpoint,
    training_summary,
)

DEFAULT_TRAIN = TrainParameters()  # frozen: one instance serves every call


class TrainError(UserError):
    """A fatal problem with the training run itself (data missing, output not writable)."""


@flow(
    name="train",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
    description="Train a checkpoint on labelled DICOM studies and register it as a model version.",
)
def train(data: str, out: str, params: TrainParameters = DEFAULT_TRAIN) -> dict[str, Any]:
    """Dataset → training → checkpoint → database (model version + ``train`` run) → report.

    Returns a summary: the checkpoint's path, sha256, version and metrics, the model_id and
    run_id in the database, and the dataset counts.

    Args:
        data: A folder with one sub-folder per class, or a CSV of ``path,label`` (paths
            relative to the CSV), on the machine that runs the flow.
        out: The checkpoint file to write (.pt).
        params: How to train.
    """
    started_at = dt.datetime.now(dt.UTC)
    settings = get_settings(device=params.device, workers=params.workers)
    policy = _check(data, out, params)
    out = str(Path(out))
    # the data set is decoded before training starts: every core decodes
    workers = available_cores() if settings.workers is None else settings.workers
    run = _run_record(data, out, params, policy, device=settings.device, workers=workers)
    run["started_at"] = started_at
    with database(settings.database_url) as engine:
        t.check_database(engine, params.name, params.version)
        report("train-start", epochs=params.epochs, data=data)
        dataset: TrainingData | None = None
        try:
            dataset = t.build_dataset(
                data,
                PreprocessSpec(input_size=params.input_size),
                hmac_key=settings.hmac_secret(),
                policy=policy,
                positive_class=params.positive_class,
                val_fraction=params.val_fraction,
                seed=params.seed,
                workers=workers,
                reduced=params.reduced,
                on_progress=lambda stage, done, total: report(
                    "train-data", stage=stage, done=done, total=total
                ),
            )
            _log_dataset(dataset.report)
            arch_kwargs = {"num_classes": len(dataset.class_names)}
            result = t.fit(
                params.architecture,
                arch_kwargs,
                dataset,
                _config(params, settings.device, dataset),
                on_epoch=lambda row: report("train-epoch", epochs=params.epochs, **row),
            )
            checkpoint = make_checkpoint(
                result,
                dataset,
                architecture=params.architecture,
                arch_kwargs=arch_kwargs,
                name=params.name,
                version=params.version,
                notes=params.notes,
                started_at=started_at,
                reduced=params.reduced,
                selection_policy=policy.to_dict(),
            )
            sha256 = t.save_checkpoint(checkpoint, out)
            counts = dataset.report.run_counts()
            model_id, run_id = t.record_training(engine, checkpoint, counts=counts, **run)
        except BaseException as exc:
            _record_failure(engine, run, dataset, exc)
            raise
    _publish(checkpoint, dataset, result, run_id)
    summary = training_summary(
        checkpoint, dataset, result, out=out, sha256=sha256, model_id=model_id, run_id=run_id
    )
    report("train-done", **summary)
    return summary


def _run_record(
    data: str, out: str, params: TrainParameters, policy: SelectionPolicy, **resolved: Any
) -> dict[str, Any]:
    """The ``train`` run's record (``training_run.record_training``'s keywords but the
    counts): its parameters with the settings resolved, selection policy, source."""
    return {
        "parameters": {
            "data": data,
            "out": out,
            **params.model_dump(exclude={"notes", "selection"}),
            **resolved,
        },
        "selection_policy": policy.to_dict(),
        "source": data,
        "prefect_flow_run_id": str(flow_run.id) if flow_run.id else None,
    }


def _config(params: TrainParameters, device: str, dataset: TrainingData) -> TrainConfig:
    return TrainConfig(
        epochs=params.epochs,
        batch_size=params.batch_size,
        lr=params.lr,
        patience=params.patience,
        target_sensitivity=params.target_sensitivity,
        augment=params.augment,
        seed=params.seed,
        device=device,
        positive_index=dataset.class_names.index(dataset.positive_class),
    )


def _publish(checkpoint, dataset: TrainingData, result, run_id: int) -> None:
    """The evaluation report and the per-epoch history, as the run's artifacts."""
    create_markdown_artifact(
        evaluation_markdown(checkpoint, dataset, result),
        key="train-evaluation",
        description=f"Validation report of {checkpoint.name} {checkpoint.version} (run {run_id})",
    )
    create_table_artifact(
        history_rows(result),
        key="train-history",
        description=f"Per-epoch history of {checkpoint.name} {checkpoint.version}",
    )


def _check(data: str, out: str, params: TrainParameters) -> SelectionPolicy:
    """The selection policy; refuses a run that cannot start."""
    if not Path(data).exists():
        raise TrainError(f"training data does not exist: {data}")
    if Path(out).is_dir():
        raise TrainError(f"--out {out} is a directory; give the checkpoint's file name")
    try:
        policy = SelectionPolicy.from_dict(params.selection) if params.selection else None
    except (TypeError, ValueError) as exc:
        raise TrainError(f"the selection policy {params.selection} is invalid: {exc}") from None
    return policy or SelectionPolicy()


def _log_dataset(rep: DatasetReport) -> None:
    get_run_logger().info(
        "dataset: %d files seen, %d used, %d skipped, %d failed; train %s, validation %s",
        rep.files_seen,
        rep.used,
        rep.skipped,
        rep.failed,
        rep.per_split["train"],
        rep.per_split["validation"],
    )
    report("train-dataset", **rep.to_dict())


def _record_failure(
    engine: Engine, run: dict[str, Any], dataset: TrainingData | None, exc: BaseException
) -> None:
    """Record the run as failed, with what the data set held; the original error is the one
    that matters, so a failure to record it is logged (and noted on it) instead."""
    counts = dataset.report.run_counts() if dataset is not None else None
    try:
        t.record_failed_training(engine, error=f"{type(exc).__name__}: {exc}", counts=counts, **run)
    except Exception as db_exc:
        get_run_logger().warning("could not record the failed training run: %s", db_exc)
        exc.add_note(f"(recording the failed training run also failed: {db_exc})")
