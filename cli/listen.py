"""``cxr-screen listen``: the C-STORE receiver that fills the drop folder ``nightly`` reads.

Runs in the foreground until Ctrl-C or SIGTERM (what a service manager sends). Logs one line
per association and a summary every minute in which something arrived: counts only, never
patient data or UIDs. ``cxr-screen serve --listen-port N`` runs the same receiver beside the
schedule.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SUMMARY_EVERY_S = 60.0

err_console = Console(stderr=True, soft_wrap=True)


def configure_logging() -> None:
    """Receiver lines on stderr with a time stamp; pynetdicom's per-message lines stay off."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def start_receiver(drop_folder: str, port: int, ae_title: str):
    """A receiver started on ``port`` for ``serve --listen-port``; a setting or a port that
    cannot be used ends the command with one line."""
    from tasks.dicom.pacs.receiver import Receiver, ReceiverConfig, ReceiverError

    configure_logging()
    try:
        receiver = Receiver(
            ReceiverConfig(drop_folder=Path(drop_folder), ae_title=ae_title, port=port)
        )
        receiver.start()
    except ReceiverError as exc:
        _fail(str(exc))
    return receiver


def run_until_stopped(receiver, stop: threading.Event) -> None:
    """Start ``receiver``, log a summary each minute something arrived, stop on ``stop``."""
    log = logging.getLogger("cxr_screen.listen")
    receiver.start()
    last = receiver.counts.as_dict()
    try:
        while not stop.wait(SUMMARY_EVERY_S):
            now = receiver.counts.as_dict()
            if now != last:
                log.info(
                    "in the last minute: stored %d, refused %d, rejected %d, failed %d; "
                    "studies receiving %d",
                    now["stored"] - last["stored"],
                    now["refused"] - last["refused"],
                    now["rejected"] - last["rejected"],
                    now["failed"] - last["failed"],
                    len(receiver.tracker.receiving()),
                )
                last = now
    finally:
        receiver.stop()


def listen_command(
    ae: Annotated[str, typer.Option("--ae", help="Our AE title (senders must call it)")] = (
        "CXRSCREEN"
    ),
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on")] = 11112,
    drop_folder: Annotated[
        Path | None,
        typer.Option("--drop-folder", help="Where instances are written (CXR_SCREEN_DROP_FOLDER)"),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (0.0.0.0: all interfaces)")
    ] = "0.0.0.0",
    max_associations: Annotated[
        int, typer.Option("--max-associations", help="Associations at once; more are rejected")
    ] = 8,
    study_idle_seconds: Annotated[
        float,
        typer.Option(
            "--study-idle-seconds",
            help="A study counts as still receiving until this long without a new instance",
        ),
    ] = 30.0,
    allow_ae: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-ae", help="Accept associations only from this calling AE title (repeatable)"
        ),
    ] = None,
    secondary_capture: Annotated[
        bool,
        typer.Option(
            "--accept-secondary-capture",
            help="Also store Secondary Capture images (refused by default: derived pictures)",
        ),
    ] = False,
    no_for_processing: Annotated[
        bool,
        typer.Option(
            "--refuse-for-processing",
            help="Refuse DX 'for processing' images instead of storing them (they are skipped "
            "by the selection policy either way)",
        ),
    ] = False,
) -> None:
    """Receive radiographs pushed by C-STORE into the drop folder that `nightly` reads."""
    from flows.settings import get_settings
    from tasks.dicom.pacs.receiver import (
        DX_FOR_PROCESSING,
        RADIOGRAPH_STORAGE,
        Receiver,
        ReceiverConfig,
        ReceiverError,
    )

    configure_logging()
    folder = drop_folder or get_settings().drop_folder
    if folder is None:
        _fail("no drop folder: pass --drop-folder or set CXR_SCREEN_DROP_FOLDER")
    classes = tuple(
        c for c in RADIOGRAPH_STORAGE if not (no_for_processing and c == DX_FOR_PROCESSING)
    )
    if secondary_capture:
        classes += (SECONDARY_CAPTURE,)
    stop = threading.Event()
    try:
        config = ReceiverConfig(
            drop_folder=Path(folder),
            ae_title=ae,
            port=port,
            host=host,
            max_associations=max_associations,
            study_idle_seconds=study_idle_seconds,
            allowed_calling_aes=tuple(allow_ae or ()),
            accepted_sop_classes=classes,
        )
        receiver = Receiver(config)
        previous = {
            s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            run_until_stopped(receiver, stop)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    except ReceiverError as exc:
        _fail(str(exc))
    counts = receiver.counts
    err_console.print(
        f"stopped: stored {counts.stored}, refused {counts.refused}, rejected {counts.rejected}, "
        f"failed {counts.failed} over {counts.associations} association(s)",
        highlight=False,
    )


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


if __name__ == "__main__":
    typer.run(listen_command)
