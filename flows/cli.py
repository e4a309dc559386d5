"""The ``cxr-screen`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="cxr-screen",
    help="Batch screening of chest radiographs: DICOM in, predictions in SQL out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Inspect and import model checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit: for fatal errors only."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@model_app.command("info")
def model_info(
    path: Annotated[Path, typer.Argument(help="Checkpoint file (.pt)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON")] = False,
) -> None:
    """Print a checkpoint's metadata: architecture, classes, threshold, preprocessing, metrics."""
    from model.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        fail(str(exc))
    meta = ckpt.metadata()
    meta["sha256"] = ckpt.sha256
    from model.network import count_parameters

    meta["parameters"] = count_parameters(ckpt.build())
    if as_json:
        sys.stdout.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return
    table = Table(show_header=False, box=None)
    for key in (
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
    ):
        table.add_row(f"[bold]{key}[/]", str(meta[key]))
    table.add_row("[bold]preprocessing[/]", json.dumps(meta["preprocessing"], sort_keys=True))
    table.add_row("[bold]provenance[/]", json.dumps(meta["provenance"], sort_keys=True))
    table.add_row("[bold]metrics[/]", json.dumps(meta["metrics"], sort_keys=True))
    console.print(table)


@model_app.command("import")
def model_import(
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
    try:
        ckpt = import_state_dict(
            state_dict,
            architecture=architecture,
            class_names=names,
            threshold=threshold,
            version=version,
        )
        sha = ckpt.save(out)
    except CheckpointError as exc:
        fail(str(exc))
    console.print(f"wrote {out} (sha256 {sha})")


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
