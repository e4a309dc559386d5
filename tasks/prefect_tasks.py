"""Prefect tasks for screening: thin wrappers over the plain functions of ``tasks/``.

One task per shard step, never per image (a task run costs ~15 ms here). Only database work is
retried, and only for transient connection errors (``sql.errors.DB_RETRIES``); bad input never
is (it is recorded). Arguments are wrapped in ``quote()`` where Prefect would otherwise walk
every file's record looking for futures (measured: ~7% of a run's CPU).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.utilities.annotations import quote
from sqlalchemy.engine import Engine

from model.checkpoint import load_checkpoint
from sql.db import connect
from sql.errors import DB_RETRIES
from tasks import screening
from tasks.ingest import ScanItem
from tasks.shard_loop import ShardSteps


@task(name="connect-database", cache_policy=NO_CACHE, **DB_RETRIES)
def connect_database(url: str) -> Engine:
    """The run's engine, its database migrated to the current schema (first use creates it)."""
    return connect(url)


@contextlib.contextmanager
def database(url: str) -> Iterator[Engine]:
    """The engine a run opens once and passes down (SQLAlchemy's advice: one per process and
    database, owned by the caller); disposed of when the run ends."""
    engine = connect_database(url)
    try:
        yield engine
    finally:
        engine.dispose()


@task(name="load-model", cache_policy=NO_CACHE)
def load_model(path: str):
    return load_checkpoint(path)


@task(name="open-run", cache_policy=NO_CACHE, **DB_RETRIES)
def open_run(engine: Engine, checkpoint, **kwargs: Any) -> screening.RunContext:
    return screening.open_run(engine, checkpoint, **kwargs)


@task(name="close-run", cache_policy=NO_CACHE, **DB_RETRIES)
def close_run(run: screening.RunContext, counts: Counter, error: str | None = None) -> None:
    screening.close_run(run, counts, error)


@task(name="read-watermark", cache_policy=NO_CACHE, **DB_RETRIES)
def read_watermark(engine: Engine, name: str):
    return screening.read_watermark(engine, name)


@task(name="write-watermark", cache_policy=NO_CACHE, **DB_RETRIES)
def write_watermark(engine: Engine, name: str, value, run_id: int) -> None:
    screening.write_watermark(engine, name, value, run_id)


# --- the shard loop's steps -----------------------------------------------------------------


@task(name="plan-shard", cache_policy=NO_CACHE, **DB_RETRIES)
def plan_shard(steps: ShardSteps, items: list[ScanItem]) -> set[str]:
    """SOP Instance UIDs of the shard this model version already predicted."""
    return steps.plan(items)


@task(name="start-shard", cache_policy=NO_CACHE)
def start_shard(steps: ShardSteps, items: list[ScanItem], skip: set[str]) -> screening.PendingShard:
    """Classify the shard's files and start decoding them in the worker pool (returns at once)."""
    return steps.start(items, skip)


@task(name="score-shard", cache_policy=NO_CACHE)
def score_shard(steps: ShardSteps, pending: screening.PendingShard) -> screening.ShardRows:
    """Wait for the shard's decoding and score its images in batches."""
    return steps.score(pending)


@task(name="persist-shard", cache_policy=NO_CACHE, **DB_RETRIES)
def persist_shard(steps: ShardSteps, rows: screening.ShardRows) -> Counter:
    """Write the shard in one transaction; the counts to add to the run's."""
    return steps.write(rows)


@dataclass
class TaskSteps:
    """``ShardSteps`` as Prefect tasks, for ``tasks.shard_loop.ShardLoop`` inside a flow: the
    write runs in the flow's task-runner thread while the loop scores the next shard."""

    plain: ShardSteps

    def plan(self, items: list[ScanItem]) -> set[str]:
        return plan_shard(quote(self.plain), quote(items))

    def start(self, items: list[ScanItem], skip: set[str]) -> screening.PendingShard:
        return start_shard(quote(self.plain), quote(items), quote(skip))

    def score(self, pending: screening.PendingShard) -> screening.ShardRows:
        return score_shard(quote(self.plain), quote(pending))

    def persist(self, rows: screening.ShardRows) -> PrefectFuture[Counter]:
        return persist_shard.submit(quote(self.plain), quote(rows))

    def close(self) -> None:
        self.plain.close()
