"""``cxr-screen model``: inspect a checkpoint, or wrap a bare state_dict into one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.console import console, exit_on_error

app = typer.Typer(help="Inspect and import model checkpoints.", no_args_is_help=True)

INFO_KEYS = (
    "name",
    "version",
    "sha256",
    "architecture",
    "parameters",
    "class_names",
    "positive_class",
    "threshold",
    "input_size",
    "preprocessing_sha256",
    "notes",
)


@app.command("info")
def info_command(
    path: Annotated[Path, typer.Argument(help="Checkpoint file (.pt)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON")] = False,
) -> None:
    """Print a checkpoint's metadata: architecture, classes, threshold, preprocessing, metrics."""
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.network import count_parameters

    with exit_on_error(CheckpointError):
        ckpt = load_checkpoint(path)
    meta = ckpt.metadata()
    meta["sha256"] = ckpt.sha256
    meta["parameters"] = count_parameters(ckpt.build())
    if as_json:
        sys.stdout.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return
    table = Table(show_header=False, box=None)
    for key in INFO_KEYS:
        table.add_row(f"[bold]{key}[/]", str(meta[key]))
    for key in ("preprocessing", "provenance", "metrics"):
        table.add_row(f"[bold]{key}[/]", json.dumps(meta[key], sort_keys=True))
    console.print(table)


@app.command("import")
def import_command(
    state_dict: Annotated[Path, typer.Argument(help="A bare state_dict saved with torch.save")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint file to write")],
    version: Annotated[str, typer.Option(help="Version string for the new checkpoint")],
    architecture: str = "lg_mobilenet_v2",
    threshold: float = 0.5,
    class_names: Annotated[
        str, typer.Option(help="Comma-separated, positive class last")
    ] = "normal,abnormal",
) -> None:
    """Wrap a state_dict trained with the seed notebook's classes into a checkpoint."""
    from model.checkpoint import CheckpointError, import_state_dict

    names = [c.strip() for c in class_names.split(",") if c.strip()]
    with exit_on_error(CheckpointError):
        ckpt = import_state_dict(
            state_dict,
            architecture=architecture,
            class_names=names,
            threshold=threshold,
            version=version,
        )
        sha = ckpt.save(out)
    console.print(f"wrote {out} (sha256 {sha})")
