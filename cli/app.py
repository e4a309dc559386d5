"""The ``cxr-screen`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli.demo import demo_command, train_command
from cli.fanout import cli as fanout_cli
from cli.serve import serve_command
from flows.common import fatal_reason, quiet_console

app = typer.Typer(
    name="cxr-screen",
    help="Batch screening of chest radiographs: DICOM in, predictions in SQL out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Inspect and import model checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")
db_app = typer.Typer(help="Manage the results database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit: for fatal errors only."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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


app.command("serve")(serve_command)
app.command("train")(train_command)
app.command("demo")(demo_command)
app.add_typer(fanout_cli, name="fanout")


@app.command()
def screen(
    sources: Annotated[list[Path], typer.Argument(help="Folders, DICOM files or archives")],
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint (default: $CXR_SCREEN_MODEL_PATH)")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
    force: Annotated[
        bool, typer.Option(help="Recompute instances this model already predicted")
    ] = False,
    shard_size: Annotated[int | None, typer.Option(min=1, help="Files per shard")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Decode processes (0: in-process; default: one per core with a GPU, on the "
            "CPU the cores less one in five for inference, plus one)",
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Inference batch size")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    full_decode: Annotated[bool, typer.Option(help="Never decode at reduced resolution")] = False,
    kind: Annotated[str, typer.Option(help="Run kind recorded with the run")] = "reprocess",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run summary as one JSON object")
    ] = False,
) -> None:
    """Screen DICOM sources with a model version and write the results to the database."""
    _run_screening(
        "screen",
        db,
        as_json,
        sources=[str(s) for s in sources],
        model=str(model) if model else None,
        force=force,
        shard_size=shard_size,
        workers=workers,
        batch_size=batch_size,
        device=device,
        reduced=not full_decode,
        kind=kind,
    )


@app.command()
def nightly(
    drop_folder: Annotated[
        Path | None, typer.Option(help="Default: $CXR_SCREEN_DROP_FOLDER")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Default: $CXR_SCREEN_MODEL_PATH")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run summary as one JSON object")
    ] = False,
) -> None:
    """Run the nightly job once now: files that arrived since the last successful night."""
    _run_screening(
        "nightly",
        db,
        as_json,
        drop_folder=str(drop_folder) if drop_folder else None,
        model=str(model) if model else None,
        device=device,
    )


def _run_screening(flow_name: str, db: str | None, as_json: bool, **params) -> None:
    """Run the ``screen`` or ``nightly`` flow here, with progress, then print its summary.

    Prefect's temporary server (when no API is configured) boots in its own process while
    this one imports torch, the flow and what the run will need first.
    """
    _database_via_environment(db)
    server = _start_server()
    quiet_console()
    from flows import screen as flows_screen

    _import_ahead()
    _wait_server(server)
    summary = _run_with_progress(getattr(flows_screen, flow_name), **params)
    print_summary(summary, as_json)


def _import_ahead() -> None:
    """Import now what the run would import on its critical path, while the server boots.

    Creating a flow run makes Prefect import FastAPI to serialise the parameters (~0.6 s here)
    and opening the run imports Alembic (~0.35 s); the server takes longer to boot than this
    process takes to import torch and the flow, so done here the wait absorbs them.
    """
    import contextlib
    import importlib

    for name in ("fastapi.encoders", "sql.db"):
        # a later Prefect may not need FastAPI; the run imports what it needs anyway
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _start_server():
    """Prefect's temporary server, booting while this process imports (see cli.server)."""
    from cli.server import start_local_server

    try:
        return start_local_server()
    except OSError as exc:
        fail(f"could not start Prefect's temporary server: {exc}")


def _wait_server(server) -> None:
    if server is None:
        return
    from cli.server import LocalServerError

    try:
        server.wait_ready()
    except LocalServerError as exc:
        fail(str(exc))


def _database_via_environment(db: str | None) -> None:
    """Hand ``--db`` to the flow through the settings, never as a flow parameter.

    Prefect stores flow parameters in its database and shows them in its UI; a URL with a
    password must not end up there. The flow reads ``CXR_SCREEN_DATABASE_URL`` when its
    ``database_url`` parameter is None.
    """
    if db:
        os.environ["CXR_SCREEN_DATABASE_URL"] = db


def _peak_memory() -> dict:
    """Peak RSS of this process (inference, shards in flight, database writes), MB.

    The decode workers are not included: they hold one chunk of one shard each.
    """
    import resource

    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _run_with_progress(flow_fn, **params):
    """Run a flow in this process with a progress bar fed by its shard events."""
    from flows import progress

    bar = Progress(
        TextColumn("[bold]screening"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    task_id = bar.add_task("screen", total=None, detail="starting")
    started = time.monotonic()

    def listener(event: str, data: dict) -> None:
        nonlocal started
        if event == "start":
            started = time.monotonic()
            bar.update(task_id, total=data.get("total"), detail=f"run {data['run_id']}")
        elif event == "shard":
            c = data.get("counts", {})
            rate = data["seen"] / max(time.monotonic() - started, 1e-6)
            bar.update(
                task_id,
                completed=data["seen"],
                detail=f"predicted {c.get('predicted', 0)} skipped {c.get('skipped', 0)} "
                f"failed {c.get('failed', 0)} ({rate:.1f} files/s)",
            )

    progress.add_listener(listener)
    try:
        with bar:
            summary = flow_fn(**params)
        return {**summary, **_peak_memory()}
    except Exception as exc:
        fail(fatal_reason(exc))
    finally:
        progress.remove_listener(listener)


def print_summary(summary: dict, as_json: bool = False) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
        return
    table = Table(title=f"Run {summary['run_id']} — {summary['model']}", show_lines=False)
    for col in ("files_seen", "predicted", "skipped", "failed", "seconds", "images_per_second"):
        table.add_column(col.replace("_", " "), justify="right")
    table.add_row(
        *(
            str(summary[c])
            for c in (
                "files_seen",
                "predicted",
                "skipped",
                "failed",
                "seconds",
                "images_per_second",
            )
        )
    )
    console.print(table)
    if summary.get("top_reasons"):
        reasons = Table(title="Why files were skipped or failed (top 10)")
        reasons.add_column("files", justify="right")
        reasons.add_column("reason", overflow="fold")
        for r in summary["top_reasons"]:
            reasons.add_row(str(r["files"]), r["reason"])
        console.print(reasons)


@db_app.command("upgrade")
def db_upgrade(
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
    reviewer_role: Annotated[
        bool, typer.Option(help="Also create the read-only reviewer role (PostgreSQL)")
    ] = False,
) -> None:
    """Create or migrate the results database to the current schema."""
    from flows.settings import get_settings
    from sql.db import apply_reviewer_role, connect, current_revision

    url = get_settings(database_url=db).database_url
    try:
        engine = connect(url)
        if reviewer_role:
            apply_reviewer_role(engine)
    except Exception as exc:
        fail(fatal_reason(exc))
    console.print(
        f"database at revision {current_revision(engine)}: {engine.url.render_as_string()}"
    )


@app.command()
def query(
    name: Annotated[str, typer.Argument(help="A query in sql/queries (see --list)")] = "",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="k=v, repeatable")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or parquet")] = "table",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="List the queries and their parameters")
    ] = False,
) -> None:
    """Run a named, parameterised query from sql/queries and export the result."""
    from flows.settings import get_settings
    from sql.db import connect
    from sql.queries import list_queries, load_query, run_query

    if list_ or not name:
        table = Table(title="queries (cxr-screen query NAME -p key=value)")
        table.add_column("name")
        table.add_column("parameters")
        table.add_column("description", overflow="fold")
        for q in map(load_query, list_queries()):
            table.add_row(q.name, ", ".join(f"{p.name}:{p.type}" for p in q.params), q.description)
        console.print(table)
        return
    if fmt not in ("table", "csv", "parquet"):
        fail(f"--format {fmt!r} is not one of table, csv, parquet")
    if fmt == "parquet" and out is None:
        fail("--format parquet needs --out FILE")
    params: dict[str, str] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--param {item!r} is not of the form key=value")
        params[key.strip()] = value
    try:
        frame = run_query(connect(get_settings(database_url=db).database_url), name, params)
    except (KeyError, ValueError, TypeError) as exc:
        fail(str(exc).strip("'\""))
    except Exception as exc:
        fail(fatal_reason(exc))
    if fmt == "parquet":
        frame.to_parquet(out, index=False)
    elif fmt == "csv":
        if out:
            frame.to_csv(out, index=False)
        else:
            sys.stdout.write(frame.to_csv(index=False))
    else:
        table = Table(title=f"{name} ({len(frame)} rows)")
        for col in frame.columns:
            table.add_column(str(col))
        for row in frame.itertuples(index=False):
            table.add_row(*("" if v is None else str(v) for v in row))
        if out:
            out.write_text(frame.to_string(index=False) + "\n")
        else:
            console.print(table)
    if out:
        console.print(f"wrote {len(frame)} rows to {out}")


@app.command()
def review(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    decision: Annotated[str, typer.Option(help="agree, disagree or uncertain")],
    reviewer: Annotated[str, typer.Option(help="Who decided")],
    note: Annotated[str | None, typer.Option(help="Free text")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
) -> None:
    """Record a reviewer's decision on a study's prediction."""
    from flows.settings import get_settings
    from sql.db import connect, session_factory
    from sql.writes import add_review

    try:
        sessions = session_factory(connect(get_settings(database_url=db).database_url))
        with sessions.begin() as session:
            review_id = add_review(
                session,
                study_instance_uid=study_uid,
                decision=decision,
                reviewer=reviewer,
                note=note,
            )
    except ValueError as exc:
        fail(str(exc))
    except Exception as exc:
        fail(fatal_reason(exc))
    console.print(f"review {review_id} recorded: {decision} by {reviewer}")


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
