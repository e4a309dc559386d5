"""Prefect tasks: thin wrappers over the plain functions of ``tasks/``.

One task per shard, never per image (a task run costs ~15 ms here). Only database writes are
retried, and only for transient connection errors; bad input never is (it is recorded).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.common import retry_on_transient_db_error
from model.checkpoint import load_checkpoint
from tasks import screening
from tasks.ingest import ScanItem

_DB_RETRIES = dict(
    retries=4,
    retry_delay_seconds=[1, 3, 10, 30],
    retry_condition_fn=retry_on_transient_db_error,
)


@task(name="load-model", cache_policy=NO_CACHE)
def load_model(path: str):
    return load_checkpoint(path)


@task(name="open-run", cache_policy=NO_CACHE, **_DB_RETRIES)
def open_run(database_url: str, checkpoint, **kwargs: Any) -> screening.RunContext:
    return screening.open_run(database_url, checkpoint, **kwargs)


@task(name="plan-shard", cache_policy=NO_CACHE, **_DB_RETRIES)
def plan_shard(ctx: screening.RunContext, items: list[ScanItem], force: bool) -> set[str]:
    return screening.plan_skips(ctx.readers, ctx.model_id, items, force)


@task(name="start-shard", cache_policy=NO_CACHE)
def start_shard(
    processor: screening.ShardProcessor, items: list[ScanItem], skip_uids: set[str]
) -> screening.PendingShard:
    """Classify the shard's files and start decoding them in the worker pool (returns at once)."""
    return processor.submit(items, skip_uids)


@task(name="score-shard", cache_policy=NO_CACHE)
def score_shard(
    processor: screening.ShardProcessor, pending: screening.PendingShard
) -> screening.ShardRows:
    """Wait for the shard's decoding and score its images in batches."""
    return processor.collect(pending)


@task(name="persist-shard", cache_policy=NO_CACHE, **_DB_RETRIES)
def persist_shard(
    ctx: screening.RunContext, rows: screening.ShardRows, force: bool, aggregation: str
) -> Counter:
    result = screening.persist_shard(
        ctx.sessions,
        run_id=ctx.run_id,
        model_id=ctx.model_id,
        rows=rows,
        force=force,
        aggregation=aggregation,
    )
    return rows.final_counts(result)


@task(name="close-run", cache_policy=NO_CACHE, **_DB_RETRIES)
def close_run(ctx: screening.RunContext, counts: Counter, error: str | None = None) -> None:
    screening.close_run(ctx, counts, error)


@task(name="read-watermark", cache_policy=NO_CACHE, **_DB_RETRIES)
def read_watermark(database_url: str, name: str):
    return screening.read_watermark(database_url, name)


@task(name="write-watermark", cache_policy=NO_CACHE, **_DB_RETRIES)
def write_watermark(database_url: str, name: str, value, run_id: int) -> None:
    screening.write_watermark(database_url, name, value, run_id)
