"""``cxr-screen screen`` and ``cxr-screen nightly``: one screening run in this process.

Without a configured Prefect API, Prefect's temporary server boots in its own process
(``cli.server.prefect_ready``) while this one imports torch, the flow and what the run will
need first. The flows are imported only when a command runs, so that ``--help`` stays fast and
the quiet logging settings are in place before Prefect configures itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cli.console import exit_on_error, run_with_progress
from cli.publish import check_write_back, report_run
from cli.server import prefect_ready

WORKERS_HELP = (
    "Decode processes (0: in-process; default: one per core with a GPU, on the CPU the cores "
    "less one in five for inference, plus one)"
)
DB_HELP = "Database URL (default: settings)"
JSON_HELP = "Print the run summary as one JSON object"
WRITE_BACK_HELP = "Then send this model's unpublished results to this PACS as DICOM SRs"


def screen_command(
    sources: Annotated[list[Path], typer.Argument(help="Folders, DICOM files or archives")],
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint (default: $CXR_SCREEN_MODEL_PATH)")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", help=DB_HELP)] = None,
    force: Annotated[
        bool, typer.Option(help="Recompute instances this model already predicted")
    ] = False,
    shard_size: Annotated[int | None, typer.Option(min=1, help="Files per shard")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help=WORKERS_HELP)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Inference batch size")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    full_decode: Annotated[bool, typer.Option(help="Never decode at reduced resolution")] = False,
    kind: Annotated[str, typer.Option(help="Run kind recorded with the run")] = "reprocess",
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    write_back: Annotated[str | None, typer.Option("--write-back", help=WRITE_BACK_HELP)] = None,
) -> None:
    """Screen DICOM sources with a model version and write the results to the database."""
    check_write_back(write_back)
    database_via_settings(db)
    with exit_on_error(), prefect_ready():
        from flows.parameters import ScreenParameters
        from flows.screen import screen
    summary = run_with_progress(
        screen,
        sources=[str(s) for s in sources],
        model=str(model) if model else None,
        params=ScreenParameters(
            force=force,
            shard_size=shard_size,
            workers=workers,
            batch_size=batch_size,
            device=device,
            reduced=not full_decode,
            kind=kind,
        ),
    )
    report_run(summary, write_back, db, as_json)


def nightly_command(
    drop_folder: Annotated[
        Path | None, typer.Option(help="Default: $CXR_SCREEN_DROP_FOLDER")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Default: $CXR_SCREEN_MODEL_PATH")] = None,
    db: Annotated[str | None, typer.Option("--db", help=DB_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    write_back: Annotated[str | None, typer.Option("--write-back", help=WRITE_BACK_HELP)] = None,
) -> None:
    """Run the nightly job once now: files that arrived since the last successful night."""
    check_write_back(write_back)
    database_via_settings(db)
    with exit_on_error(), prefect_ready():
        from flows.screen import nightly
    summary = run_with_progress(
        nightly,
        drop_folder=str(drop_folder) if drop_folder else None,
        model=str(model) if model else None,
        device=device,
    )
    report_run(summary, write_back, db, as_json)


def database_via_settings(db: str | None) -> None:
    """Hand ``--db`` to the flow through the settings, never as a flow parameter.

    Prefect stores flow parameters in its database and shows them in its UI; a URL with a
    password must not end up there. The flows read ``CXR_SCREEN_DATABASE_URL``.
    """
    if db:
        os.environ["CXR_SCREEN_DATABASE_URL"] = db
