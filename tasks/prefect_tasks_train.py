"""Prefect tasks for the ``train`` flow: one task per stage, thin wrappers over plain functions.

Only the database steps are retried, and only for transient connection errors. The engine
is the run's (``tasks.prefect_tasks.database``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Engine

from model.checkpoint import Checkpoint
from model.spec import PreprocessSpec
from model.training import TrainConfig, TrainResult, build_and_train
from sql.errors import DB_RETRIES
from tasks import training_run
from tasks.dicom.selection import SelectionPolicy
from tasks.training_data import Progress, TrainingData, build_training_data


@task(name="check-database", cache_policy=NO_CACHE, **DB_RETRIES)
def check_database(engine: Engine, name: str, version: str | None) -> None:
    training_run.check_database(engine, name, version)


@task(name="build-dataset", cache_policy=NO_CACHE)
def build_dataset(
    data: str,
    spec: PreprocessSpec,
    *,
    hmac_key: bytes,
    policy: SelectionPolicy,
    positive_class: str | None,
    val_fraction: float,
    seed: int,
    workers: int,
    reduced: bool,
    on_progress: Progress | None = None,
) -> TrainingData:
    return build_training_data(
        data,
        spec,
        hmac_key=hmac_key,
        policy=policy,
        positive_class=positive_class,
        val_fraction=val_fraction,
        seed=seed,
        workers=workers,
        reduced=reduced,
        on_progress=on_progress,
    )


@task(name="fit", cache_policy=NO_CACHE)
def fit(
    architecture: str,
    arch_kwargs: dict[str, Any],
    data: TrainingData,
    config: TrainConfig,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    return build_and_train(architecture, arch_kwargs, data.train, data.validation, config, on_epoch)


@task(name="save-checkpoint", cache_policy=NO_CACHE)
def save_checkpoint(checkpoint: Checkpoint, out: str) -> str:
    return checkpoint.save(out)


@task(name="record-training", cache_policy=NO_CACHE, **DB_RETRIES)
def record_training(engine: Engine, checkpoint: Checkpoint, **run: Any) -> tuple[int, int]:
    """``training_run.record_training``: ``run`` holds its keyword arguments."""
    return training_run.record_training(engine, checkpoint, **run)


@task(name="record-failed-training", cache_policy=NO_CACHE, **DB_RETRIES)
def record_failed_training(engine: Engine, **run: Any) -> int:
    return training_run.record_failed_training(engine, **run)
