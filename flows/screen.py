"""The screening flows: ``screen`` (ad hoc / reprocess) and ``nightly`` (drop folder + watermark).

Flows only compose; the work lives in ``tasks/``: every shard goes through the one
double-buffered shard loop (``tasks/shard_loop.py``) with its steps as Prefect tasks. A run
opens its results database once and passes the engine down. The database URL comes from the
settings only, never from a flow parameter: Prefect stores parameters and shows them.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from sqlalchemy.engine import Engine

from flows.errors import UserError
from flows.parameters import ScreenParameters
from flows.progress import report
from flows.settings import Settings, get_settings, pacs_config
from model.predictor import resolve_device
from tasks import pacs_run
from tasks import prefect_tasks as t
from tasks.device.processor import shard_processor
from tasks.dicom.pacs.config import PacsConfig, PacsConfigError, is_pacs_source
from tasks.dicom.pacs.source import PacsRetrieval
from tasks.dicom.selection import SelectionPolicy
from tasks.ingest import estimate_total, scan, shards
from tasks.interrupts import held, in_charge, note, signal_of, stopping
from tasks.screening import RunContext, ShardRows, close_run
from tasks.shard_loop import ShardLoop, ShardSteps, Tally

DEFAULT_SCREEN = ScreenParameters()  # frozen: one instance serves every call


class ScreenError(UserError):
    """A fatal problem with the run itself (no model, source missing, database down)."""


@flow(
    name="screen",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
    description="Screen DICOM sources (folders, files, .zip/.tar/.tar.gz, PACS) with a model "
    "version.",
)
def screen(
    sources: list[str], model: str | None = None, params: ScreenParameters = DEFAULT_SCREEN
) -> dict[str, Any]:
    """Discover → header scan + selection → plan → shards (decode, infer, persist) → summary.

    Args:
        sources: Folders, DICOM files or archives on the machine that runs the flow, and PACS
            (``pacs://NAME``, ``dicomweb+https://...``, ``dimse://AET@host:port``; which
            studies: ``params.study_date`` / ``since`` / ``study_uids``).
        model: The checkpoint to screen with (default: CXR_SCREEN_MODEL_PATH).
        params: How to screen.
    """
    with in_charge():
        settings = _settings(params)
        model_path, policy = _check(sources, model, params, settings)
        with (
            t.database(settings.database_url) as engine,
            _pacs_sources(sources, params, settings, policy, engine) as retrievals,
        ):
            return screen_on(
                engine, sources, model_path, policy, params, settings, retrievals=retrievals
            )


@flow(
    name="nightly",
    description="Screen what arrived in the drop folder (or a PACS's recent studies) since the "
    "last success.",
)
def nightly(
    drop_folder: str | None = None,
    model: str | None = None,
    device: str | None = None,
    pacs: str | None = None,
) -> dict[str, Any]:
    """Screen files that arrived since the last successful nightly run, then move the watermark.

    The watermark (stored in the database, per drop folder) is the time the last successful
    scan started; a failed run leaves it alone, so the next night picks the files up again.
    Re-running is safe: already-predicted instances are skipped by the planner.

    From a PACS (``pacs``), the watermark is a study-date window instead: from the last
    successful night's last study date minus ``CXR_SCREEN_PACS_OVERLAP_DAYS`` to today, plus
    the studies found partial before (asked for by UID). It does not move when the retrieval
    stopped part-way or a query was capped.

    Args:
        drop_folder: The folder to scan (default: CXR_SCREEN_DROP_FOLDER).
        model: The checkpoint to screen with (default: CXR_SCREEN_MODEL_PATH).
        device: auto, cpu or cuda (default: CXR_SCREEN_DEVICE).
        pacs: A PACS to screen instead of the drop folder (``pacs://NAME``,
            ``dicomweb+https://...``, ``dimse://AET@host:port``).
    """
    with in_charge():
        params = ScreenParameters(device=device, kind="nightly")
        settings = _settings(params)
        if pacs:
            return _nightly_pacs(pacs, model, params, settings)
        folder = drop_folder or (str(settings.drop_folder) if settings.drop_folder else None)
        if not folder:
            raise ScreenError("no drop folder: pass --drop-folder or set CXR_SCREEN_DROP_FOLDER")
        model_path, policy = _check([folder], model, params, settings)
        name = f"nightly:{Path(folder).resolve()}"
        with t.database(settings.database_url) as engine:
            since = t.read_watermark(engine, name)
            scan_started = datetime.now(UTC)
            newer = params.model_copy(update={"newer_than": since.timestamp() if since else None})
            summary = screen_on(engine, [folder], model_path, policy, newer, settings)
            t.write_watermark(engine, name, scan_started, summary["run_id"])
    create_markdown_artifact(
        f"Nightly run {summary['run_id']}: {summary['files_seen']} new files since "
        f"{since.isoformat() if since else 'the beginning'}; "
        f"watermark now {scan_started.isoformat()}",
        key="nightly-watermark",
    )
    return summary


def _nightly_pacs(
    source: str, model: str | None, params: ScreenParameters, settings: Settings
) -> dict[str, Any]:
    """The nightly run from a PACS: a study-date window from the watermark (with an overlap),
    and the studies partial before; the watermark moves only after a whole retrieval."""
    if not is_pacs_source(source):
        raise ScreenError(
            f"--pacs {source!r} is not a PACS source (pacs://NAME, dicomweb+https://..., "
            "dimse://AET@host:port)"
        )
    model_path, policy = _check([source], model, params, settings)
    name = f"nightly:pacs:{_resolve(source, _config())}"
    today = datetime.now(ZoneInfo(settings.timezone)).date()
    with t.database(settings.database_url) as engine:
        mark = t.read_watermark(engine, name)
        window = pacs_run.nightly_window(
            mark.date() if mark else None, settings.pacs_overlap_days, today
        )
        night = params.model_copy(update={"study_date": str(window)})
        with _pacs_sources([source], night, settings, policy, engine) as retrievals:
            summary = screen_on(
                engine, [source], model_path, policy, night, settings, retrievals=retrievals
            )
            moved = pacs_run.retrieval_complete(retrievals)
            if moved:
                last = datetime(window.last.year, window.last.month, window.last.day, tzinfo=UTC)
                t.write_watermark(engine, name, last, summary["run_id"])
    create_markdown_artifact(
        f"Nightly run {summary['run_id']} from {name[len('nightly:pacs:') :]}: study dates "
        f"{window}, {summary['files_seen']} files; "
        + ("watermark now " + str(window.last) if moved else "watermark NOT moved")
        + " (the retrieval stopped part-way or a query was capped)" * (not moved),
        key="nightly-watermark",
    )
    return summary


def _config() -> PacsConfig:
    try:
        return pacs_config()
    except PacsConfigError as exc:
        raise ScreenError(str(exc)) from None


def _resolve(spec: str, config: PacsConfig) -> str:
    try:
        return pacs_run.pacs_name(spec, config)
    except PacsConfigError as exc:
        raise ScreenError(str(exc)) from None


@contextlib.contextmanager
def _pacs_sources(
    sources: list[str],
    params: ScreenParameters,
    settings: Settings,
    policy: SelectionPolicy,
    engine: Engine,
) -> Iterator[list[PacsRetrieval]]:
    """The PACS sources' retrievals, their study queries run (before anything is recorded:
    a PACS that cannot be used is one line, ``ScreenError``); closed (spool removed) after."""
    specs = [s for s in sources if is_pacs_source(s)]
    if not specs:
        yield []
        return
    config = _config()
    try:
        window = pacs_run.study_window(params.study_date, params.since)
        pending = {
            n: pacs_run.pending_studies(engine, n) for n in {_resolve(s, config) for s in specs}
        }
        retrievals = pacs_run.open_retrievals(
            specs,
            config,
            window=window,
            study_uids=params.study_uids,
            pending=pending,
            policy=policy,
            connections=params.connections,
            spool_dir=settings.home / "spool",
        )
    except pacs_run.PacsRunError as exc:
        raise ScreenError(str(exc)) from None
    try:
        yield retrievals
    finally:
        for retrieval in retrievals:
            retrieval.close()


def screen_on(
    engine: Engine,
    sources: list[str],
    model_path: str,
    policy: SelectionPolicy,
    params: ScreenParameters,
    settings: Settings,
    retrievals: Sequence[PacsRetrieval] = (),
) -> dict[str, Any]:
    """One screening run on the caller's engine: record it, run the shard loop, close it.

    Everything that can refuse the run (the model, the device) is checked before the run row
    is written. Whatever ends the run (its last shard, an error, SIGINT or SIGTERM), it is
    closed in one place (:func:`_close`), after its last shard committed or rolled back,
    with the counts of the shards that committed. ``retrievals``: the PACS sources of
    ``sources``, prepared (``tasks.pacs_run``); their partial studies are recorded for the
    next run.
    """
    local = [s for s in sources if not is_pacs_source(s)]
    checkpoint = t.load_model(model_path)
    processor = shard_processor(
        checkpoint,
        pixel_path=settings.pixel_path,
        device=settings.device,
        workers=settings.workers,
        batch_size=settings.batch_size,
        reduced=params.reduced,
        thumbnails_dir=settings.thumbnails_dir,
    )
    run: RunContext | None = None
    loop: ShardLoop | None = None
    ending: BaseException | None = None
    try:
        with held():  # a stop while the run is recorded comes once its id is known
            run = t.open_run(
                engine,
                checkpoint,
                kind=params.kind,
                source=", ".join(str(s) for s in sources),
                parameters=_recorded(params, settings, len(sources)),
                selection_policy=policy.to_dict(),
                prefect_flow_run_id=str(flow_run.id) if flow_run.id else None,
                stale_after=settings.stale_run_after,
            )
        progress = _Progress(run.run_id, None if retrievals else estimate_total(local))
        report("start", run_id=run.run_id, total=progress.total, model=checkpoint.version)
        with processor:
            if retrievals:
                steps: ShardSteps = pacs_run.PacsShardSteps(
                    run,
                    processor,
                    force=params.force,
                    aggregation=params.aggregation,
                    retrievals=retrievals,
                )
            else:
                steps = ShardSteps(
                    run, processor, force=params.force, aggregation=params.aggregation
                )
            loop = ShardLoop(t.TaskSteps(steps), on_stored=progress.stored)
            items = scan(
                [*local, *retrievals],
                settings.hmac_secret(),
                policy,
                newer_than=params.newer_than,
                in_workers=True,  # the decode workers scan the files they read
            )
            loop.run(shards(items, settings.shard_size))
            partial = pacs_run.record_partials(engine, retrievals, run.run_id) if retrievals else {}
    except BaseException as exc:
        ending = exc
        raise
    finally:
        if run is not None:
            _close(run, loop, ending)
    progress.done()
    return _summary(run, loop.tally, retrievals, partial)


def _close(run: RunContext, loop: ShardLoop | None, ending: BaseException | None) -> None:
    """Close the run, once its shard loop has settled: ``completed``, ``failed`` (``ending``
    an error) or ``interrupted`` (``ending`` SIGINT or SIGTERM), with the counts of the shards
    that committed. Stop signals are held meanwhile (a repeated Ctrl-C is ignored).

    An interrupted run is closed with the plain function, not the task: no retries (a stop
    must be quick) and no call to Prefect's API on the way. If even that fails, the run stays
    ``running`` (marked ``abandoned`` later) and the interruption still ends the command.
    """
    tally = loop.tally if loop is not None else Tally()
    shards_stored = loop.shards_stored if loop is not None else 0
    signum = signal_of(ending) or (stopping() if ending is not None else None)
    with held():
        if signum is None:
            error = None if ending is None else f"{type(ending).__name__}: {ending}"
            t.close_run(run, tally.counts, error)
            return
        note(signum)
        try:
            close_run(run, tally.counts, interrupted_by=signum)
        except Exception as exc:
            ending.add_note(f"run {run.run_id} could not be closed as interrupted: {exc}")
            get_run_logger().error("run %d could not be closed as interrupted: %s", run.run_id, exc)
        report(
            "interrupted",
            run_id=run.run_id,
            signal=signum,
            shards=shards_stored,
            files=tally.files,
            counts=dict(tally.counts),
        )


def _settings(params: ScreenParameters) -> Settings:
    return get_settings(
        device=params.device,
        shard_size=params.shard_size,
        workers=params.workers,
        batch_size=params.batch_size,
    )


def _check(
    sources: list[str], model: str | None, params: ScreenParameters, settings: Settings
) -> tuple[str, SelectionPolicy]:
    """The model's path and the selection policy; refuses a run that cannot start."""
    model_path = model or (str(settings.model_path) if settings.model_path else None)
    if not model_path:
        raise ScreenError("no model given: pass --model PATH or set CXR_SCREEN_MODEL_PATH")
    missing = [s for s in sources if not is_pacs_source(s) and not Path(s).exists()]
    if missing:
        raise ScreenError(f"source does not exist: {missing[0]}")
    if not Path(model_path).is_file():
        raise ScreenError(f"checkpoint {model_path!r} does not exist or is not a file")
    check_device(settings.device)
    try:
        policy = SelectionPolicy.from_dict(params.selection) if params.selection else None
    except (TypeError, ValueError) as exc:
        raise ScreenError(f"the selection policy {params.selection} is invalid: {exc}") from None
    return model_path, policy or SelectionPolicy()


def check_device(device: str) -> None:
    """Refuse a device this machine cannot run on (before anything is recorded)."""
    import torch

    try:
        resolved = resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        raise ScreenError(f"--device {device!r}: {exc}") from None
    if resolved.type == "cuda" and resolved.index is not None:
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise ScreenError(
                f"--device {device!r}: this machine has {count} CUDA GPU(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )


def _recorded(params: ScreenParameters, settings: Settings, n_sources: int) -> dict[str, Any]:
    """The run's parameters as the runs table records them (settings resolved)."""
    return {
        "force": params.force,
        "shard_size": settings.shard_size,
        "workers": settings.workers,
        "batch_size": settings.batch_size,
        "device": settings.device,
        "reduced": params.reduced,
        "aggregation": params.aggregation,
        "newer_than": params.newer_than,
        "sources": n_sources,
        "study_date": params.study_date,
        "since": params.since,
        "study_uids": len(params.study_uids),
        "connections": params.connections,
    }


class _Progress:
    """A run's progress for the CLI's listeners (``flows.progress``), Prefect's progress
    artifact and the run's log, after each stored shard."""

    def __init__(self, run_id: int, total: int | None) -> None:
        self.total = total
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(
            0.0, key="screen-progress", description=f"run {run_id}: files processed"
        )

    def stored(self, rows: ShardRows, counts: Counter, tally: Tally) -> None:
        report("shard", files=rows.files, seen=tally.files, counts=dict(tally.counts))
        if self.total:
            update_progress_artifact(self.artifact, min(100.0, 100.0 * tally.files / self.total))
        self.logger.info("shard stored: %d files (%d seen so far)", rows.files, tally.files)

    def done(self) -> None:
        update_progress_artifact(self.artifact, 100.0)


def _summary(
    run: RunContext,
    tally: Tally,
    retrievals: Sequence[PacsRetrieval] = (),
    partial: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The run's summary (returned, reported to listeners, and shown as artifacts)."""
    seconds = time.perf_counter() - run.started
    predicted = tally.counts["predicted"]
    summary = {
        "run_id": run.run_id,
        "model": f"{run.checkpoint.name} {run.checkpoint.version}",
        "files_seen": tally.files,
        "predicted": predicted,
        "skipped": tally.counts["skipped"],
        "failed": tally.counts["failed"],
        "seconds": round(seconds, 2),
        "images_per_second": round(predicted / seconds, 2) if seconds else 0.0,
        "top_reasons": [{"reason": r, "files": n} for r, n in tally.reasons.most_common(10) if r],
    }
    create_table_artifact(
        [{k: v for k, v in summary.items() if k != "top_reasons"}],
        key="screen-summary",
        description=f"Run {run.run_id}: every file seen ends as predicted, skipped or failed.",
    )
    if retrievals:
        summary["pacs"] = [r.report.summary() for r in retrievals]
        summary["partial_studies"] = sum(len(v) for v in (partial or {}).values())
        create_markdown_artifact(
            "\n".join(f"- {line}" for line in summary["pacs"]),
            key="screen-pacs",
            description=f"Run {run.run_id}: what the PACS sources announced and delivered",
        )
    if summary["top_reasons"]:
        create_table_artifact(
            summary["top_reasons"],
            key="screen-skip-reasons",
            description=f"Run {run.run_id}: most common reasons files were skipped or failed",
        )
    report("done", **summary)
    return summary
