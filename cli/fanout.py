"""The ``cxr-screen fanout`` commands, kept light: the flows are imported only when one runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

WORK_POOL = "cxr-screen"
SHARD_QUEUE = "shards"
CONTROL_QUEUE = "control"
MAX_IN_FLIGHT_CAP = 64  # threads of the parent's task runner; max_in_flight may not exceed it

cli = typer.Typer(help="Fan-out reprocessing across Prefect workers", no_args_is_help=True)


@cli.command("register")
def register_command(
    pool: Annotated[str, typer.Option(help="Process work pool (created if missing)")] = WORK_POOL,
    shard_queue: Annotated[str, typer.Option(help="Queue the GPU workers poll")] = SHARD_QUEUE,
    control_queue: Annotated[
        str, typer.Option(help="Queue the fan-out parents run from")
    ] = CONTROL_QUEUE,
) -> None:
    """Register the shard and fan-out deployments on the Prefect server (PREFECT_API_URL)."""
    from flows.common import quiet_prefect_defaults

    quiet_prefect_defaults()
    _require_server()
    from flows.fanout import register_deployments

    ids = register_deployments(pool, shard_queue=shard_queue, control_queue=control_queue)
    for name, deployment_id in ids.items():
        typer.echo(f"registered {name} ({deployment_id}) on pool {pool}")


@cli.command("run")
def run_command(
    sources: Annotated[list[Path], typer.Argument(help="Folders, files or archives")],
    model: Annotated[Path | None, typer.Option(help="Checkpoint every worker can read")] = None,
    force: Annotated[bool, typer.Option(help="Recompute what this model predicted")] = False,
    manifest_size: Annotated[
        int | None, typer.Option(min=1, help="Files per shard (one sub-flow run each)")
    ] = None,
    max_in_flight: Annotated[int, typer.Option(min=1, max=MAX_IN_FLIGHT_CAP)] = 8,
    shard_timeout: Annotated[
        float | None, typer.Option(help="Seconds before a shard's run is cancelled and retried")
    ] = None,
    spool_dir: Annotated[
        Path | None, typer.Option(help="Shared folder for .tar.gz members (every worker)")
    ] = None,
    job_key: Annotated[
        str | None, typer.Option(help="Resume the fan-out job with this key")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", help="Results database URL")] = None,
) -> None:
    """Reprocess sources across the workers of a Prefect server (this process is the parent)."""
    from cli.app import _run_with_progress, print_summary
    from flows.common import quiet_console

    quiet_console()
    _require_server()
    from flows.fanout import screen_fanout

    summary = _run_with_progress(
        screen_fanout,
        sources=[str(s) for s in sources],
        model=str(model) if model else None,
        force=force,
        manifest_size=manifest_size,
        max_in_flight=max_in_flight,
        shard_timeout_s=shard_timeout,
        spool_dir=str(spool_dir) if spool_dir else None,
        job_key=job_key,
        database_url=db,
    )
    print_summary(summary)


def _require_server() -> None:
    """Fan-out needs a real Prefect server with workers; Prefect's temporary one has none."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        typer.echo(
            "error: fan-out needs a Prefect server with workers: set PREFECT_API_URL "
            "(e.g. http://prefect-server:4200/api)",
            err=True,
        )
        raise typer.Exit(2)
