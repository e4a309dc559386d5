"""``cxr-screen fanout``: reprocessing across the workers of a Prefect server.

The flows (and Prefect) are imported only when a command runs, so that ``--help`` stays fast;
the pool and queue names default to the flows' own (``flows.fanout``), resolved then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.console import (
    exit_on_error,
    fail,
    print_summary,
    quiet_console,
    quiet_prefect_defaults,
    run_with_progress,
)
from cli.screen import database_via_settings

app = typer.Typer(help="Fan-out reprocessing across Prefect workers.", no_args_is_help=True)


@app.command("register")
def register_command(
    pool: Annotated[
        str | None, typer.Option(help="Process work pool, created if missing (default: cxr-screen)")
    ] = None,
    shard_queue: Annotated[
        str | None, typer.Option(help="Queue the GPU workers poll (default: shards)")
    ] = None,
    control_queue: Annotated[
        str | None, typer.Option(help="Queue the fan-out parents run from (default: control)")
    ] = None,
) -> None:
    """Register the shard and fan-out deployments on the Prefect server (PREFECT_API_URL)."""
    quiet_prefect_defaults()
    require_server()
    from flows import fanout

    pool = pool or fanout.WORK_POOL
    with exit_on_error():
        ids = fanout.register_deployments(
            pool,
            shard_queue=shard_queue or fanout.SHARD_QUEUE,
            control_queue=control_queue or fanout.CONTROL_QUEUE,
        )
    for name, deployment_id in ids.items():
        typer.echo(f"registered {name} ({deployment_id}) on pool {pool}")


@app.command("run")
def run_command(
    sources: Annotated[list[Path], typer.Argument(help="Folders, files or archives")],
    model: Annotated[Path | None, typer.Option(help="Checkpoint every worker can read")] = None,
    force: Annotated[bool, typer.Option(help="Recompute what this model predicted")] = False,
    manifest_size: Annotated[
        int | None, typer.Option(min=1, help="Files per shard (one sub-flow run each)")
    ] = None,
    max_in_flight: Annotated[
        int, typer.Option(min=1, help="Shard runs at once (at most 64, the parent's threads)")
    ] = 8,
    shard_timeout: Annotated[
        float | None, typer.Option(help="Seconds before a shard's run is cancelled and retried")
    ] = None,
    spool_dir: Annotated[
        Path | None, typer.Option(help="Shared folder for .tar.gz members (every worker)")
    ] = None,
    job_key: Annotated[
        str | None, typer.Option(help="Resume the fan-out job with this key")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Results database URL of this process, the parent (default: settings); the "
            "workers read their own CXR_SCREEN_DATABASE_URL, which must name the same database",
        ),
    ] = None,
) -> None:
    """Reprocess sources across the workers of a Prefect server (this process is the parent)."""
    quiet_console()
    require_server()
    database_via_settings(db)  # this process's; the workers read their own environment's
    from flows.fanout import screen_fanout
    from flows.parameters import FanoutParameters

    with exit_on_error():
        params = FanoutParameters(
            force=force,
            manifest_size=manifest_size,
            max_in_flight=max_in_flight,
            shard_timeout_s=shard_timeout,
            spool_dir=str(spool_dir) if spool_dir else None,
            job_key=job_key,
        )
    summary = run_with_progress(
        screen_fanout,
        sources=[str(s) for s in sources],
        model=str(model) if model else None,
        params=params,
    )
    print_summary(summary)


def require_server() -> None:
    """Fan-out needs a real Prefect server with workers; Prefect's temporary one has none."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        fail(
            "fan-out needs a Prefect server with workers: set PREFECT_API_URL "
            "(e.g. http://prefect-server:4200/api)"
        )
