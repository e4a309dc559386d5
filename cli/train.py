"""``cxr-screen train``: train a checkpoint on labelled studies, with progress, in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.console import PipelineProgress, console, exit_on_error, training_table
from cli.screen import DB_HELP, WORKERS_HELP, database_via_settings
from cli.server import prefect_ready


def train_command(
    data: Annotated[
        Path, typer.Argument(help="Folder with one sub-folder per class, or a CSV of path,label")
    ],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint file to write (.pt)")],
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs")] = 30,
    batch_size: Annotated[int, typer.Option(min=2)] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine)")] = 3e-3,
    architecture: Annotated[str, typer.Option()] = "lg_mobilenet_v2",
    input_size: Annotated[int, typer.Option(min=32)] = 150,
    version: Annotated[
        str | None, typer.Option(help="Model version (default: UTC date-time + weights hash)")
    ] = None,
    name: Annotated[str, typer.Option(help="Model name")] = "cxr-screen",
    notes: Annotated[str, typer.Option(help="Free text stored in the checkpoint")] = "",
    positive_class: Annotated[
        str | None, typer.Option(help="Default: 'positive' or 'abnormal', else the last class")
    ] = None,
    val_fraction: Annotated[float, typer.Option(min=0.01, max=0.99)] = 0.2,
    target_sensitivity: Annotated[float, typer.Option(min=0.01, max=1.0)] = 0.95,
    seed: Annotated[int, typer.Option()] = 0,
    db: Annotated[str | None, typer.Option("--db", help=DB_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help=WORKERS_HELP)] = None,
) -> None:
    """Train a checkpoint on labelled DICOM studies and register it in the database."""
    database_via_settings(db)
    with exit_on_error(), prefect_ready():
        from flows.parameters import TrainParameters
        from flows.train import train
    with exit_on_error(), PipelineProgress():
        params = TrainParameters(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            architecture=architecture,
            input_size=input_size,
            version=version,
            name=name,
            notes=notes,
            seed=seed,
            target_sensitivity=target_sensitivity,
            val_fraction=val_fraction,
            device=device,
            workers=workers,
            positive_class=positive_class,
        )
        summary = train(str(data), str(out), params=params)
    console.print(training_table(summary))
