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
SOURCES_HELP = (
    "Folders, DICOM files or archives, and PACS: pacs://NAME (configured), "
    "dicomweb+https://HOST/dicom-web, dimse://AET@HOST:PORT"
)
STUDY_DATE_HELP = "PACS sources: study date or range (2026-11-28, 2026-11-01..2026-11-28)"
SINCE_HELP = "PACS sources: study dates from this date (YYYY-MM-DD) to today"
CONNECTIONS_HELP = "PACS sources: parallel HTTP connections / DIMSE associations"


def screen_command(
    sources: Annotated[list[str], typer.Argument(help=SOURCES_HELP)],
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
    study_date: Annotated[str | None, typer.Option("--study-date", help=STUDY_DATE_HELP)] = None,
    since: Annotated[str | None, typer.Option(help=SINCE_HELP)] = None,
    connections: Annotated[int | None, typer.Option(min=1, max=64, help=CONNECTIONS_HELP)] = None,
) -> None:
    """Screen DICOM sources with a model version and write the results to the database."""
    with stop_on_signals():
        with exit_on_error():
            device, checkpoint = check_options(sources, model, device, kind)
            check_pacs_options(sources, study_date, since, connections)
        check_write_back(write_back)
        database_via_settings(db)
        with exit_on_error(), prefect_ready():
            from flows.parameters import ScreenParameters
            from flows.screen import screen

            check_before_the_run(device, checkpoint)  # while the server boots
        summary = run_with_progress(
            screen,
            sources=[s if is_pacs(s) else str(Path(s)) for s in sources],
            model=str(model) if model else None,
            params=ScreenParameters(
                force=force,
                shard_size=shard_size,
                workers=workers,
                batch_size=batch_size,
                device=device,
                reduced=not full_decode,
                kind=kind,
                study_date=study_date,
                since=since,
                connections=connections,
            ),
        )
        report_run(summary, write_back, db, as_json)
        print_pacs_lines(summary, as_json)


def nightly_command(
    drop_folder: Annotated[
        Path | None, typer.Option(help="Default: $CXR_SCREEN_DROP_FOLDER")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Default: $CXR_SCREEN_MODEL_PATH")] = None,
    db: Annotated[str | None, typer.Option("--db", help=DB_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    write_back: Annotated[str | None, typer.Option("--write-back", help=WRITE_BACK_HELP)] = None,
    pacs: Annotated[
        str | None,
        typer.Option(
            help="Screen this PACS's recent studies instead of the drop folder (pacs://NAME, "
            "dicomweb+https://..., dimse://AET@HOST:PORT)"
        ),
    ] = None,
) -> None:
    """Run the nightly job once now: files that arrived since the last successful night."""
    with stop_on_signals():
        with exit_on_error():
            if pacs is not None and drop_folder is not None:
                from flows.errors import UserError

                raise UserError("give either --drop-folder or --pacs, not both")
            if pacs is not None and not is_pacs(pacs):
                pacs = f"pacs://{pacs}"  # a configured name
            folders = [str(drop_folder)] if drop_folder else []
            device, checkpoint = check_options(folders + ([pacs] if pacs else []), model, device)
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
            pacs=pacs,
        )
        report_run(summary, write_back, db, as_json)
        print_pacs_lines(summary, as_json)


DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_options(
    sources: list[str] | list[Path],
    model: Path | None,
    device: str | None,
    kind: str | None = None,
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
    pacs = [str(s) for s in sources if is_pacs(str(s))]
    for source in sources:
        if not is_pacs(str(source)) and not Path(source).exists():
            raise UserError(f"source does not exist: {source}")
    if pacs:
        from flows.settings import pacs_config

        config = pacs_config()  # an unknown name or a bad URL: one line before anything starts
        for spec in pacs:
            config.resolve(spec)
    checkpoint = model or settings.model_path
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {str(checkpoint)!r} does not exist or is not a file")
    return settings.device, Path(checkpoint) if checkpoint is not None else None


def is_pacs(source: str) -> bool:
    from tasks.dicom.pacs.config import is_pacs_source

    return is_pacs_source(source)


def check_pacs_options(
    sources: list[str], study_date: str | None, since: str | None, connections: int | None
) -> None:
    """The study-date options go with PACS sources, and a PACS source needs one of them."""
    from flows.errors import UserError
    from tasks.dicom.pacs.common import StudyWindow

    has_pacs = any(is_pacs(s) for s in sources)
    given = [n for n, v in (("--study-date", study_date), ("--since", since)) if v]
    given += ["--connections"] if connections is not None else []
    if given and not has_pacs:
        raise UserError(f"{', '.join(given)}: only for PACS sources (pacs://NAME, ...)")
    if has_pacs:
        if not study_date and not since:
            raise UserError("a PACS source needs --study-date DATE[..DATE] or --since DATE")
        if study_date and since:
            raise UserError("give either --study-date or --since, not both")
        try:
            window = StudyWindow.parse(study_date or since or "")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if since and window.days != 1:
            raise UserError(f"--since {since!r} should be one date (YYYY-MM-DD)")


def print_pacs_lines(summary: dict, as_json: bool) -> None:
    """What each PACS source announced and delivered, under the run's summary."""
    if as_json:
        return
    from cli.console import console

    for line in summary.get("pacs", []):
        console.print(line, highlight=False, soft_wrap=True)
    if summary.get("partial_studies"):
        console.print(
            f"{summary['partial_studies']} partial stud(y/ies): screened, not aggregated, "
            "pulled again on the next run",
            highlight=False,
        )


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
