"""Fan-out reprocessing across workers on Prefect's own machinery (server, work pool, workers).

``screen-fanout`` (the parent) plans the sources into shard manifests stored in the results
database, launches one ``screen-shard`` sub-flow run per manifest on a work pool with
``run_deployment`` (at most ``max_in_flight`` at once, each with an idempotency key, so a
retried parent never starts a shard twice), re-aggregates the studies whose images landed in
different manifests, and closes the run. ``screen-shard`` runs on a worker (one per GPU): it
takes the device's concurrency slot, claims its manifest and screens it, committing chunk by
chunk (``tasks/manifests.py``). The plain logic lives in ``tasks/manifests.py`` and
``sql/manifests.py``; this module only composes it with Prefect.

Topology (``docker/compose.yaml``): work pool ``cxr-screen`` (type process); queue ``shards``
(and ``default``, for the nightly/reprocess/train deployments of ``prefect.yaml``) served by one
worker per GPU started with ``--limit 1``; queue ``control`` served by a small CPU worker that
runs fan-out parents (a parent waits for its shards: on a GPU worker's only slot it would wait
for itself).

Recovery: a shard whose sub-flow run crashes, fails, or outlives ``shard_timeout_s`` (then it
is cancelled) is launched again, up to ``shard_attempts`` times; the new run resumes the
manifest after its last committed chunk. A re-run of the parent with the same ``job_key``
(Prefect's flow retries keep the flow run id, which is the default key) re-plans identically,
skips done manifests and finds the sub-flow runs it had started through their idempotency keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from sqlalchemy.engine import Engine

from flows.parameters import MAX_IN_FLIGHT_CAP, FanoutParameters
from flows.progress import report
from flows.screen import ScreenError
from flows.settings import Settings, get_settings
from model.checkpoint import Checkpoint
from sql import manifests as store
from sql.db import session_factory
from tasks import manifests as fan
from tasks import prefect_tasks as t
from tasks.device.processor import shard_processor
from tasks.dicom.selection import SelectionPolicy

WORK_POOL = "cxr-screen"
SHARD_QUEUE = "shards"
CONTROL_QUEUE = "control"
SHARD_FLOW = "screen-shard"
SHARD_DEPLOYMENT = f"{SHARD_FLOW}/shard"
FANOUT_DEPLOYMENT_NAME = "reprocess-fanout"
DEVICE_LIMIT_PREFIX = "cxr-screen-device:"
DEFAULT_FANOUT = FanoutParameters()  # frozen: one instance serves every call


class FanoutError(ScreenError):
    """A fan-out job cannot start or did not finish (the message says which shard and why)."""


# --- the device slot ---------------------------------------------------------------------------


def device_slot(settings: Settings) -> str | None:
    """The concurrency limit this worker's shards hold, or None (CPU without a named slot)."""
    if settings.device_slot:
        return DEVICE_LIMIT_PREFIX + settings.device_slot
    from model.predictor import resolve_device

    device = resolve_device(settings.device)
    if device.type != "cuda":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or str(device.index or 0)
    return f"{DEVICE_LIMIT_PREFIX}{socket.gethostname()}/cuda:{visible}"


def ensure_device_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit ``name`` (limit 1) unless it exists; an operator's
    own setting for an existing limit is kept."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another worker created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )


@contextlib.contextmanager
def holding_device(name: str | None):
    """Hold the device's concurrency slot for the whole shard (the model sits on the GPU)."""
    if name is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_device_limit(name)
    get_run_logger().info("waiting for the device slot %s", name)
    # The slot's lease is renewed in the background. If renewal fails (the server restarting),
    # the shard carries on rather than losing its work: a GPU briefly shared is slower, while
    # results stay exact either way (chunks commit with their manifest's progress).
    with concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        yield


def worker_label(settings: Settings) -> str:
    """Who screened a manifest: host and device slot (or the worker's process id)."""
    return f"{socket.gethostname()}/{settings.device_slot or f'worker-pid-{os.getppid()}'}"


# --- the shard sub-flow (runs on a worker) ----------------------------------------------------


@flow(
    name=SHARD_FLOW,
    task_runner=ThreadPoolTaskRunner(max_workers=2),
    description="Screen one shard manifest of a fan-out job (on a worker).",
)
def screen_shard(
    manifest_id: int,
    model: str,
    job_key: str | None = None,
    device: str | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Claim manifest ``manifest_id`` and screen what is left of it on this worker's device.

    The job's own settings (force, selection, shard size, aggregation, reduced decoding) come
    from the manifest; this worker's come from its environment (database URL, device, decode
    processes, home, HMAC key, device slot). The model file must be the one the job planned,
    and the manifest must belong to ``job_key`` (else this worker's database is another).
    """
    # pydicom logs each decoder failure at ERROR with a traceback; the reason is stored with the
    # file (file_outcomes.reason), so this run's log keeps to the shard's progress.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    settings = get_settings(device=device, workers=workers, batch_size=batch_size)
    if not Path(model).is_file():
        raise FanoutError(f"the model file {model} does not exist on this worker")
    checkpoint = t.load_model(model)
    with t.database(settings.database_url) as engine:
        result = _screen_manifest(engine, manifest_id, job_key, checkpoint, settings)
    m = result.manifest
    get_run_logger().info(
        "manifest %d (shard %d of job %s): %s, %d files this run, counts %s",
        m.manifest_id,
        m.shard_index,
        m.job_key,
        "already done" if result.already_done else m.status,
        result.files,
        dict(result.counts),
    )
    return {
        "manifest_id": m.manifest_id,
        "shard_index": m.shard_index,
        "status": m.status,
        "files": result.files,
        "counts": dict(m.counts),
        "already_done": result.already_done,
        "worker": m.worker,
    }


def _screen_manifest(
    engine: Engine, manifest_id: int, job_key: str | None, checkpoint, settings: Settings
) -> fan.ManifestResult:
    """The manifest through the shard loop (its steps as tasks), holding the device's slot."""
    with session_factory(engine)() as session:
        manifest = store.get_manifest(session, manifest_id, with_files=False)
    fan.check_job(manifest, job_key)
    if manifest.done:  # nothing to do: neither the device slot nor decode processes
        return fan.ManifestResult(manifest, already_done=True)
    logger = get_run_logger()
    with (
        holding_device(device_slot(settings)),
        shard_processor(
            checkpoint,
            pixel_path=settings.pixel_path,
            device=settings.device,
            workers=settings.workers,
            batch_size=settings.batch_size,
            reduced=bool(manifest.parameters.get("reduced", True)),
            thumbnails_dir=settings.thumbnails_dir,
        ) as processor,
    ):
        return fan.screen_manifest(
            engine,
            manifest_id,
            processor,
            hmac_key=settings.hmac_secret(),
            worker=worker_label(settings),
            job_key=job_key,
            prefect_flow_run_id=str(flow_run.id) if flow_run.id else None,
            on_chunk=lambda r: logger.info(
                "manifest %d: %d of %d files committed",
                manifest_id,
                r.manifest.files_done,
                r.manifest.n_files,
            ),
            wrap_steps=t.TaskSteps,
        )


# --- the parent flow ------------------------------------------------------------------------


@task(name="launch-shard", cache_policy=NO_CACHE)
def launch_shard(
    sessions,
    manifest: store.Manifest,
    *,
    deployment: str,
    job_key: str,
    parameters: dict[str, Any],
    attempts: int,
    timeout_s: float | None,
    poll_s: float,
) -> store.Manifest:
    """Run the shard's sub-flow until its manifest is done, at most ``attempts`` times.

    Attempt ``k`` uses the idempotency key ``<job_key>:shard-<index>:try-<k>``: a retried
    parent gets the runs it started before instead of new ones.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    logger = get_run_logger()
    index = manifest.shard_index
    last = "not started"
    for attempt in range(attempts):
        child = run_deployment(
            deployment,
            parameters=parameters,
            idempotency_key=f"{job_key}:shard-{index}:try-{attempt}",
            flow_run_name=f"shard-{index:05d}-try-{attempt}",
            timeout=timeout_s,
            poll_interval=poll_s,
            tags=["cxr-screen", "fanout-shard"],
        )
        state = child.state
        if state is None or not state.is_final():
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(
                    child.id,
                    Cancelling(message=f"no result after {timeout_s:g} s; launching it again"),
                    force=True,
                )
            last = f"still {state.name if state else 'unscheduled'} after {timeout_s:g} s"
        else:
            last = f"{state.name}: {state.message or ''}".strip()
        with sessions() as session:
            current = store.get_manifest(session, manifest.manifest_id, with_files=False)
        if current.done:
            return current
        if current.error:
            last += f" (manifest error: {current.error})"
        logger.warning(
            "shard %d (manifest %d) attempt %d of %d did not finish: %s",
            index,
            manifest.manifest_id,
            attempt + 1,
            attempts,
            last,
        )
    raise FanoutError(
        f"shard {index} (manifest {manifest.manifest_id}) did not finish after {attempts} "
        f"attempt(s); last: {last}"
    )


@flow(
    name="screen-fanout",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_IN_FLIGHT_CAP),
    description="Reprocess large sources across workers: one sub-flow run per shard manifest.",
)
def screen_fanout(
    sources: list[str], model: str | None = None, params: FanoutParameters = DEFAULT_FANOUT
) -> dict[str, Any]:
    """Plan → launch one sub-flow run per manifest (bounded) → re-aggregate split studies.

    The workers read the results database's URL (and the HMAC key) from their own
    environment, never from a parameter: Prefect stores parameters and shows them.

    Args:
        sources: Folders, files or archives, at paths every worker sees.
        model: The checkpoint, at a path every worker sees (default: CXR_SCREEN_MODEL_PATH).
        params: How to plan and launch the job.
    """
    logger = get_run_logger()
    settings = get_settings(shard_size=params.shard_size)
    spec = _job_spec(sources, model, params, settings)
    started = time.perf_counter()
    with t.database(settings.database_url) as engine:
        sessions = session_factory(engine)
        job = fan.open_job(
            sessions,
            spec.checkpoint,
            job_key=spec.key,
            source=", ".join(str(s) for s in sources),
            parameters={**spec.parameters, **spec.recorded},
            prefect_flow_run_id=str(flow_run.id) if flow_run.id else None,
            stale_after=settings.stale_run_after,
        )
        if job.completed:
            logger.info("fan-out job %s was already completed (run %d)", job.job_key, job.run_id)
        manifests = _plan(sessions, job, sources, spec)
        try:
            failures = _launch_all(
                sessions,
                manifests,
                run_id=job.run_id,
                max_in_flight=params.max_in_flight,
                deployment=params.deployment,
                job_key=job.job_key,
                parameters={"model": spec.model_path, "job_key": job.job_key},
                attempts=params.shard_attempts,
                timeout_s=params.shard_timeout_s,
                poll_s=params.poll_s,
            )
            if failures:
                first, exc = failures[0]
                raise FanoutError(
                    f"{len(failures)} of {len(manifests)} shard(s) did not finish; first: "
                    f"shard {first.shard_index}: {exc}"
                )
            final, counts, split = fan.finish_job(
                sessions,
                job,
                aggregation=params.aggregation,
                force=params.force,
                spool_dir=spec.spool,
            )
        except BaseException as exc:  # the run records why; the manifests keep the progress
            fan.fail_job(sessions, job, exc)
            raise
    return _summary(job, spec, final, counts, split, time.perf_counter() - started)


@dataclass(frozen=True)
class _JobSpec:
    """A fan-out job's inputs, checked: the model, the key, the spool, what manifests carry."""

    model_path: str
    checkpoint: Checkpoint
    key: str
    manifest_size: int
    spool: str | None
    parameters: dict[str, Any]  # every manifest's: how its files are screened
    recorded: dict[str, Any]  # added to the run's record


def _job_spec(
    sources: list[str], model: str | None, params: FanoutParameters, settings: Settings
) -> _JobSpec:
    """Check the job's inputs and load its model; ``FanoutError`` says what is wrong."""
    model_path = model or (str(settings.model_path) if settings.model_path else None)
    if not model_path:
        raise FanoutError("no model given: pass model or set CXR_SCREEN_MODEL_PATH")
    if not sources:
        raise FanoutError("no sources given")
    missing = [s for s in [model_path, *sources] if not Path(s).exists()]
    if missing:
        raise FanoutError(f"{missing[0]} does not exist")
    size = params.manifest_size or settings.manifest_size
    for name, value in (("manifest_size", size), ("shard_size", settings.shard_size)):
        if value < 1:
            raise FanoutError(f"a {name} of {value} is invalid, it must be at least 1")
    try:
        policy = SelectionPolicy.from_dict(params.selection) if params.selection else None
    except (TypeError, ValueError) as exc:
        raise FanoutError(f"the selection policy {params.selection} is invalid: {exc}") from None
    key = params.job_key or (str(flow_run.id) if flow_run.id else None)
    if not key:
        raise FanoutError("no job_key: run the fan-out as a Prefect flow or give a job_key")
    model_path = str(Path(model_path).resolve())
    checkpoint = t.load_model(model_path)
    return _JobSpec(
        model_path=model_path,
        checkpoint=checkpoint,
        key=key,
        manifest_size=size,
        spool=params.spool_dir or (str(settings.spool_dir) if settings.spool_dir else None),
        parameters={
            "force": params.force,
            "reduced": params.reduced,
            "aggregation": params.aggregation,
            "shard_size": settings.shard_size,
            "selection": (policy or SelectionPolicy()).to_dict(),
            "model_sha256": checkpoint.sha256,
            "key_fingerprint": fan.key_fingerprint(settings.hmac_secret()),
        },
        recorded={
            "fanout": True,
            "job_key": key,
            "manifest_size": size,
            "max_in_flight": params.max_in_flight,
            "sources": len(sources),
        },
    )


def _plan(sessions, job: fan.Job, sources: list[str], spec: _JobSpec) -> list[store.Manifest]:
    """The job's manifests (planned now, or as planned before); a plan that cannot be made
    closes the run as failed with the reason (and forgets a new job's partial plan)."""
    try:
        manifests = fan.plan_job(
            sessions,
            job_key=job.job_key,
            sources=[str(Path(s).resolve()) for s in sources],
            run_id=job.run_id,
            model_id=job.model_id,
            parameters=spec.parameters,
            manifest_size=spec.manifest_size,
            spool_dir=spec.spool,
        )
    except (fan.CompressedTarError, store.ManifestError) as exc:
        fan.close_job(sessions, job, error=str(exc), forget=not job.resumed)
        raise FanoutError(str(exc)) from None
    except BaseException as exc:
        fan.fail_job(sessions, job, exc)
        raise
    total = sum(m.n_files for m in manifests)
    report("start", run_id=job.run_id, total=total)
    get_run_logger().info(
        "fan-out job %s (run %d): %d files in %d manifests, %d already done",
        job.job_key,
        job.run_id,
        total,
        len(manifests),
        sum(m.done for m in manifests),
    )
    return manifests


def _summary(
    job: fan.Job,
    spec: _JobSpec,
    final: list[store.Manifest],
    counts: dict[str, int],
    split: list[str],
    seconds: float,
) -> dict[str, Any]:
    by_worker: dict[str, int] = {}
    for m in final:
        by_worker[m.worker or "?"] = by_worker.get(m.worker or "?", 0) + 1
    summary = {
        "run_id": job.run_id,
        "job_key": job.job_key,
        "model": f"{spec.checkpoint.name} {spec.checkpoint.version}",
        "files_seen": counts["files_seen"],
        "predicted": counts["predicted"],
        "skipped": counts["skipped"],
        "failed": counts["failed"],
        "manifests": len(final),
        "split_studies": len(split),
        "workers": by_worker,
        "seconds": round(seconds, 2),
        "images_per_second": round(counts["predicted"] / seconds, 2) if seconds else 0.0,
    }
    create_table_artifact(
        [{k: v for k, v in summary.items() if k != "workers"}],
        key="fanout-summary",
        description=f"Run {job.run_id}: fan-out job {job.job_key}",
    )
    create_table_artifact(
        [{"worker": w, "manifests": n} for w, n in sorted(by_worker.items())],
        key="fanout-workers",
        description=f"Run {job.run_id}: manifests screened per worker (last claim)",
    )
    report("done", **summary)
    return summary


def _launch_all(
    sessions,
    manifests: list[store.Manifest],
    *,
    run_id: int,
    max_in_flight: int,
    parameters: dict[str, Any],
    **launch: Any,
) -> list[tuple[store.Manifest, BaseException]]:
    """Launch a sub-flow run per manifest not yet done, at most ``max_in_flight`` at once;
    returns the shards that did not finish, with why."""
    progress_id = create_progress_artifact(
        0.0, key="fanout-progress", description=f"run {run_id}: files in finished shards"
    )
    finished = [m for m in manifests if m.done]
    failures: list[tuple[store.Manifest, BaseException]] = []
    in_flight: dict = {}

    def collect() -> None:
        done, _ = wait_futures(list(in_flight), return_when=FIRST_COMPLETED)
        for wrapped in done:
            future, manifest = in_flight.pop(wrapped)
            try:
                finished.append(future.result())
            except Exception as exc:
                failures.append((manifest, exc))
        _progress(progress_id, finished, manifests)

    for manifest in manifests:
        if manifest.done:
            continue
        while len(in_flight) >= max_in_flight:
            collect()
        future = launch_shard.submit(
            sessions,
            manifest,
            parameters={**parameters, "manifest_id": manifest.manifest_id},
            **launch,
        )
        in_flight[future.wrapped_future] = (future, manifest)
    while in_flight:
        collect()
    return failures


def _progress(progress_id, finished: list, manifests: list) -> None:
    from prefect.artifacts import update_progress_artifact

    done = sum(m.n_files for m in finished)
    total = sum(m.n_files for m in manifests) or 1
    update_progress_artifact(progress_id, min(100.0, 100.0 * done / total))
    counts: dict[str, int] = {}
    for m in finished:
        for k, v in m.counts.items():
            counts[k] = counts.get(k, 0) + int(v)
    report("shard", files=done, seen=done, counts=counts)


# --- deployments -------------------------------------------------------------------------------


def register_deployments(
    work_pool: str = WORK_POOL,
    *,
    shard_queue: str = SHARD_QUEUE,
    control_queue: str = CONTROL_QUEUE,
    create_pool: bool = True,
) -> dict[str, str]:
    """Register ``screen-shard/shard`` (queue ``shard_queue``) and
    ``screen-fanout/reprocess-fanout`` (queue ``control_queue``) on a process work pool,
    creating the pool if asked. Module entrypoints: workers import the installed package,
    whatever their working directory. Returns deployment name -> id."""
    import importlib

    from prefect.deployments.runner import EntrypointType

    if create_pool:
        ensure_work_pool(work_pool)
    # The flows as the installed module names them (not ``__main__`` under ``python -m``).
    flows = importlib.import_module("flows.fanout")
    module = EntrypointType.MODULE_PATH
    deployments = {
        SHARD_DEPLOYMENT: flows.screen_shard.to_deployment(
            "shard",
            work_pool_name=work_pool,
            work_queue_name=shard_queue,
            description="One shard manifest of a fan-out job; launched by screen-fanout only",
            tags=["cxr-screen", "fanout-shard"],
            entrypoint_type=module,
        ),
        f"screen-fanout/{FANOUT_DEPLOYMENT_NAME}": flows.screen_fanout.to_deployment(
            FANOUT_DEPLOYMENT_NAME,
            work_pool_name=work_pool,
            work_queue_name=control_queue,
            description="Reprocess large sources across the GPU workers (parameters: sources, "
            "model, and params: force, manifest_size, max_in_flight, spool_dir, ...)",
            tags=["cxr-screen", "reprocess", "fanout"],
            entrypoint_type=module,
        ),
    }
    return {name: str(d.apply()) for name, d in deployments.items()}


def ensure_work_pool(name: str) -> None:
    """Create a ``process`` work pool with Prefect's default job template unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type="process",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
