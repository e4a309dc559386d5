"""The screening flows: ``screen`` (ad hoc / reprocess) and ``nightly`` (drop folder + watermark).

Flows only compose tasks; the work lives in ``tasks/``.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.errors import UserError
from flows.progress import report
from flows.settings import get_settings
from tasks import prefect_tasks as t
from tasks.dicom.selection import SelectionPolicy
from tasks.ingest import estimate_total, scan, shards
from tasks.screening import ShardProcessor


class ScreenError(UserError):
    """A fatal problem with the run itself (no model, source missing, database down)."""


@flow(
    name="screen",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
    description="Screen DICOM sources (folders, files, .zip/.tar/.tar.gz) with a model version.",
)
def screen(
    sources: list[str],
    model: str | None = None,
    force: bool = False,
    shard_size: int | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    reduced: bool = True,
    database_url: str | None = None,
    kind: str = "reprocess",
    aggregation: str = "max",
    newer_than: float | None = None,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Discover → header scan + selection → plan → shards (decode, infer, persist) → summary."""
    logger = get_run_logger()
    settings = get_settings(
        database_url=database_url,
        device=device,
        shard_size=shard_size,
        workers=workers,
        batch_size=batch_size,
    )
    model_path = model or (str(settings.model_path) if settings.model_path else None)
    if not model_path:
        raise ScreenError("no model given: pass --model PATH or set CXR_SCREEN_MODEL_PATH")
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise ScreenError(f"source does not exist: {missing[0]}")
    policy = SelectionPolicy.from_dict(selection) if selection else SelectionPolicy()
    checkpoint = t.load_model(model_path)
    parameters = {
        "force": force,
        "shard_size": settings.shard_size,
        "workers": settings.workers,
        "batch_size": settings.batch_size,
        "device": settings.device,
        "reduced": reduced,
        "aggregation": aggregation,
        "newer_than": newer_than,
        "sources": len(sources),
    }
    ctx = t.open_run(
        settings.database_url,
        checkpoint,
        kind=kind,
        source=", ".join(str(s) for s in sources),
        parameters=parameters,
        selection_policy=policy.to_dict(),
        prefect_flow_run_id=str(flow_run.id) if flow_run.id else None,
        stale_after=settings.stale_run_after,
    )
    total = estimate_total(sources)
    report("start", run_id=ctx.run_id, total=total, model=checkpoint.version)
    progress_id = create_progress_artifact(
        0.0, key="screen-progress", description=f"run {ctx.run_id}: files processed"
    )
    counts: Counter = Counter()
    reasons: Counter = Counter()
    seen = 0
    started = time.perf_counter()
    error: str | None = None
    writing = None
    try:
        with ShardProcessor(
            checkpoint,
            device=settings.device,
            workers=settings.workers,
            batch_size=settings.batch_size,
            reduced=reduced,
            thumbnails_dir=settings.thumbnails_dir,
        ) as processor:
            items = scan(sources, settings.hmac_secret(), policy, newer_than=newer_than)
            # Double-buffered: the workers decode shard N+1 while this process scores shard N,
            # and shard N-1 is written to the database in a task-runner thread meanwhile.
            # quote(): Prefect would otherwise walk every file's record in each task's
            # arguments looking for futures (measured: ~7% of a run's CPU).
            pending = None
            for shard in _then_none(shards(items, settings.shard_size)):
                submitted = None
                if shard is not None:
                    skip = t.plan_shard(quote(ctx), quote(shard), force)
                    submitted = t.start_shard(quote(processor), quote(shard), quote(skip))
                if pending is not None:
                    rows = t.score_shard(quote(processor), quote(pending))
                    if writing is not None:
                        counts += writing[0].result()
                        seen = _stored(writing[1], seen, counts, total, progress_id, logger)
                    writing = (
                        t.persist_shard.submit(quote(ctx), quote(rows), force, aggregation),
                        rows,
                    )
                    reasons += rows.reasons
                pending = submitted
            if writing is not None:
                counts += writing[0].result()
                seen = _stored(writing[1], seen, counts, total, progress_id, logger)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        if writing is not None:
            writing[0].wait()  # let an in-flight shard commit (or not) before closing the run
        t.close_run(ctx, counts, error)
        raise
    t.close_run(ctx, counts)
    update_progress_artifact(progress_id, 100.0)
    seconds = time.perf_counter() - started
    summary = {
        "run_id": ctx.run_id,
        "model": f"{checkpoint.name} {checkpoint.version}",
        "files_seen": seen,
        "predicted": counts["predicted"],
        "skipped": counts["skipped"],
        "failed": counts["failed"],
        "seconds": round(seconds, 2),
        "images_per_second": round(counts["predicted"] / seconds, 2) if seconds else 0.0,
        "top_reasons": [{"reason": r, "files": n} for r, n in reasons.most_common(10) if r],
    }
    create_table_artifact(
        [{k: v for k, v in summary.items() if k != "top_reasons"}],
        key="screen-summary",
        description=f"Run {ctx.run_id}: every file seen ends as predicted, skipped or failed.",
    )
    if summary["top_reasons"]:
        create_table_artifact(
            summary["top_reasons"],
            key="screen-skip-reasons",
            description=f"Run {ctx.run_id}: most common reasons files were skipped or failed",
        )
    report("done", **summary)
    return summary


def _then_none(iterable):
    """The items, then one ``None`` so that the last pending shard is finished too."""
    yield from iterable
    yield None


def _stored(rows, seen, counts, total, progress_id, logger) -> int:
    """Report one stored shard (CLI listeners, progress artifact, log); return files seen."""
    seen += rows.files
    report("shard", files=rows.files, seen=seen, counts=dict(counts))
    if total:
        update_progress_artifact(progress_id, min(100.0, 100.0 * seen / total))
    logger.info("shard stored: %d files (%d seen so far)", rows.files, seen)
    return seen


@flow(name="nightly", description="Screen what arrived in the drop folder since the last success.")
def nightly(
    drop_folder: str | None = None,
    model: str | None = None,
    database_url: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Screen files that arrived since the last successful nightly run, then move the watermark.

    The watermark (stored in the database, per drop folder) is the time the last successful
    scan started; a failed run leaves it alone, so the next night picks the files up again.
    Re-running is safe: already-predicted instances are skipped by the planner.
    """
    settings = get_settings(database_url=database_url)
    folder = drop_folder or (str(settings.drop_folder) if settings.drop_folder else None)
    if not folder:
        raise ScreenError("no drop folder: pass --drop-folder or set CXR_SCREEN_DROP_FOLDER")
    name = f"nightly:{Path(folder).resolve()}"
    since = t.read_watermark(settings.database_url, name)
    scan_started = datetime.now(UTC)
    summary = screen(
        [folder],
        model=model,
        # not settings.database_url: the subflow reads the same settings, and a URL passed here
        # would be recorded by Prefect as a parameter, with its password, for anyone to see
        database_url=database_url,
        device=device,
        kind="nightly",
        newer_than=since.timestamp() if since else None,
    )
    t.write_watermark(settings.database_url, name, scan_started, summary["run_id"])
    create_markdown_artifact(
        f"Nightly run {summary['run_id']}: {summary['files_seen']} new files since "
        f"{since.isoformat() if since else 'the beginning'}; "
        f"watermark now {scan_started.isoformat()}",
        key="nightly-watermark",
    )
    return summary
