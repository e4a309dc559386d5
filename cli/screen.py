"""``cxr-screen screen`` and ``cxr-screen nightly``: one screening run in this process.

Without a configured Prefect API, Prefect's temporary server boots in its own process
(``cli.server.prefect_ready``) while this one imports torch, the flow and what the run will
need first. The flows are imported only when a command runs, so that ``--help`` stays fast and
the quiet logging settings are in place before Prefect configures itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from cli.console import exit_on_error, run_with_progress
from cli.publish import check_write_back, report_run
from cli.server import prefect_ready
from cli.stopping import stop_on_signals

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
    with stop_on_signals():
        with exit_on_error():
            device, checkpoint = check_options(sources, model, device, kind)
        check_write_back(write_back)
        database_via_settings(db)
        with exit_on_error(), prefect_ready():
            from flows.parameters import ScreenParameters
            from flows.screen import screen

            check_before_the_run(device, checkpoint)  # while the server boots
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
    with stop_on_signals():
        with exit_on_error():
            device, checkpoint = check_options([drop_folder] if drop_folder else [], model, device)
        check_write_back(write_back)
        database_via_settings(db)
        with exit_on_error(), prefect_ready():
            from flows.screen import nightly

            check_before_the_run(device, checkpoint)
        summary = run_with_progress(
            nightly,
            drop_folder=str(drop_folder) if drop_folder else None,
            model=str(model) if model else None,
            device=device,
        )
        report_run(summary, write_back, db, as_json)


DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_options(
    sources: list[Path], model: Path | None, device: str | None, kind: str | None = None
) -> tuple[str, Path | None]:
    """What can be refused before anything starts (no server, no torch yet): the run kind,
    the device's name, the sources and the model file. Returns the device and the checkpoint
    to use (the options, else the settings'); whether this machine has the device and the
    file is a checkpoint are checked once torch is imported (:func:`check_before_the_run`),
    still before anything is recorded."""
    from flows.errors import UserError
    from flows.parameters import SCREEN_KINDS
    from flows.settings import get_settings

    if kind is not None and kind not in SCREEN_KINDS:
        raise UserError(f"--kind {kind!r} is not a screening run's kind: {', '.join(SCREEN_KINDS)}")
    settings = get_settings(device=device)
    if not DEVICE_FORM.fullmatch(settings.device):
        where = "--device" if device else "CXR_SCREEN_DEVICE"
        raise UserError(f"{where} {settings.device!r} is not one of auto, cpu, cuda or cuda:N")
    for source in sources:
        if not source.exists():
            raise UserError(f"source does not exist: {source}")
    checkpoint = model or settings.model_path
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {str(checkpoint)!r} does not exist or is not a file")
    return settings.device, Path(checkpoint) if checkpoint is not None else None


def check_before_the_run(device: str, checkpoint: Path | None) -> None:
    """Checked while the Prefect server boots, so that a run that cannot start is refused at
    once and before any run row is written (the flow checks the same again, for runs started
    elsewhere): this machine has the device, the model file is a checkpoint, and the results
    database answers and has this version's schema, tables, columns and views
    (``sql.db.connect`` migrates a new or older one and refuses one that differs, naming what
    differs and what to run)."""
    from flows.screen import check_device
    from flows.settings import get_settings
    from model.checkpoint import load_checkpoint
    from sql.db import connect

    check_device(device)
    if checkpoint is not None:
        load_checkpoint(checkpoint)
    connect(get_settings().database_url).dispose()


def database_via_settings(db: str | None) -> None:
    """Hand ``--db`` to the flow through the settings, never as a flow parameter.

    Prefect stores flow parameters in its database and shows them in its UI; a URL with a
    password must not end up there. The flows read ``CXR_SCREEN_DATABASE_URL``.
    """
    if db:
        os.environ["CXR_SCREEN_DATABASE_URL"] = db
