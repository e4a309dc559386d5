"""Everything the commands show on a terminal: fatal errors, quiet Prefect, progress, tables.

- **Fatal errors** are one line on stderr, ``error: <reason>``, and exit status 2.
  :func:`fatal_reason` says a :class:`~flows.errors.UserError` (and the lower layers' errors
  meant for the user) by its message alone, a lost database connection as such, and anything
  else with its class name. ``--debug`` or ``CXR_SCREEN_DEBUG=1`` prints the traceback first.
- **Quiet Prefect**: no INFO lines or server noise on the terminal; the run logs still reach
  Prefect's API in full.
- **One progress display** (:class:`PipelineProgress`) drawn from the events the flows report
  through ``flows.progress``: the screening bar, the training stages, the demo's stages.
- **Tables** for run summaries and trained models.

Importing this module costs only ``rich``: Prefect, torch and SQLAlchemy are imported when a
command runs, so that ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NoReturn

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from flows.errors import UserError

console = Console()
err_console = Console(stderr=True)

DEBUG_ENV = "CXR_SCREEN_DEBUG"
# Exceptions that end a command on purpose; they must pass through exit_on_error.
_CLICK_EXITS = (typer.Exit, click.exceptions.Abort, click.ClickException)

# --- fatal errors ------------------------------------------------------------------------------


def enable_debug() -> None:
    """``--debug``: tracebacks behind fatal errors, here and in any process this one starts."""
    os.environ[DEBUG_ENV] = "1"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _user_error_types() -> tuple[type[BaseException], ...]:
    """UserError and the errors of lower layers whose message is meant for the user.

    Looked up among the modules already imported: an error of a module that was never
    imported cannot have been raised, and importing it here would load torch for nothing.
    """
    found: list[type[BaseException]] = [UserError]
    for module, name in (
        ("model.checkpoint", "CheckpointError"),
        ("tasks.training_data", "TrainingDataError"),
        ("sql.db", "SchemaMismatch"),
    ):
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


def _is_database_connection_error(exc: BaseException) -> bool:
    sa_exc = sys.modules.get("sqlalchemy.exc")
    return sa_exc is not None and isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else ""


def fatal_reason(exc: BaseException) -> str:
    """One line for a fatal error: the message that matters, no traceback."""
    if _is_database_connection_error(exc):
        cause = exc.orig if getattr(exc, "orig", None) else exc
        return f"the results database is unreachable: {_first_line(cause)}"
    if isinstance(exc, _user_error_types()):
        return _first_line(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit: for fatal errors only.

    Called while an exception is being handled and with debugging on, the traceback of that
    exception is printed first.
    """
    current = sys.exc_info()[1]
    if current is not None and debug_enabled():
        import traceback

        sys.stderr.write("".join(traceback.format_exception(current)))
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def exit_on_error(
    *kinds: type[BaseException], reason: Callable[[BaseException], str] = fatal_reason
) -> Iterator[None]:
    """For a command's body: an error of ``kinds`` (default: any ``Exception``) becomes one
    ``error: <reason>`` line on stderr and exit status 2, without a traceback."""
    caught = kinds or (Exception,)
    try:
        yield
    except _CLICK_EXITS:
        raise  # an exit already decided (fail() inside the block, Typer's own errors)
    except caught as exc:
        if _interrupted(exc):
            raise  # SIGINT/SIGTERM stopped the run: cli.stopping says so, not as an error
        fail(reason(exc))


def _interrupted(exc: BaseException) -> bool:
    """The error came out of a stop (SIGINT, SIGTERM) under way (``tasks.interrupts``; not
    imported for this: without it no stop can have started)."""
    interrupts = sys.modules.get("tasks.interrupts")
    return interrupts is not None and bool(interrupts.signal_of(exc) or interrupts.stopping())


# --- quiet Prefect -----------------------------------------------------------------------------


def quiet_prefect_defaults() -> None:
    """No telemetry on an offline machine; set before Prefect is imported by a command."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The temporary local server migrates its SQLite database on first start, which takes
    # longer than Prefect's 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def quiet_console() -> None:
    """No Prefect INFO lines or server shutdown noise on the terminal.

    Call before the first flow runs: Prefect configures logging on import and passes its
    settings to the temporary server it starts. Flow and task logs still reach the Prefect API
    in full. If Prefect is already configured, its console handlers are quieted.
    """
    import logging

    quiet_prefect_defaults()
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    for name in ("pydicom", "prefect.server", "uvicorn", "prefect._internal", "docket"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "uvicorn"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL)


# --- progress ----------------------------------------------------------------------------------


class _TimeLeft(TimeRemainingColumn):
    """``left 0:01:23`` while a task with a known total runs; nothing otherwise."""

    def render(self, task) -> Text:
        if task.total is None or task.finished:
            return Text("")
        return Text.assemble("left ", super().render(task))


class PipelineProgress:
    """The one progress display: a bar per stage, drawn from the flows' events.

    Events (``flows.progress``): ``start``/``shard``/``done`` from the screening flows,
    ``train-data``/``train-epoch``/``train-done`` from training, ``demo-stage`` from the demo.
    ``transient``: the bars disappear when the block ends (a summary table follows).
    """

    def __init__(self, *, transient: bool = False, target: Console | None = None) -> None:
        # Counts and times never wrap; on a narrow terminal the detail text gives way first.
        self.progress = Progress(
            TextColumn("[bold]{task.description:<18}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=20),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn(
                "{task.fields[detail]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", min_width=8),
            ),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            _TimeLeft(table_column=Column(no_wrap=True)),
            console=target or err_console,
            transient=transient,
        )
        self.tasks: dict[str, TaskID] = {}
        self._screen_started = time.monotonic()

    def __enter__(self) -> PipelineProgress:
        from flows.progress import add_listener

        add_listener(self)
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from flows.progress import remove_listener

        remove_listener(self)
        self.progress.stop()

    def _task(self, key: str, label: str, total: int | None = None) -> TaskID:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(label, total=total, detail="")
        return self.tasks[key]

    def finish(self, key: str) -> None:
        if key in self.tasks:
            tid = self.tasks[key]
            done = next(t.completed for t in self.progress.tasks if t.id == tid)
            self.progress.update(tid, total=max(done, 1), completed=max(done, 1))

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        handler = self._handlers.get(event)
        if handler is not None:
            handler(self, data)

    def _demo_stage(self, data: dict[str, Any]) -> None:
        tid = self._task(data["key"], data["label"], data.get("total"))
        if data.get("done"):
            self.finish(data["key"])
        elif "completed" in data:
            self.progress.update(tid, completed=data["completed"], detail=data.get("detail", ""))

    def _train_data(self, data: dict[str, Any]) -> None:
        if data["stage"] == "scan":
            self.progress.update(self._task("scan", "reading headers"), completed=data["done"])
        else:
            self.finish("scan")
            tid = self._task("decode", "decoding images", data["total"])
            self.progress.update(tid, completed=data["done"], total=data["total"])

    def _train_epoch(self, data: dict[str, Any]) -> None:
        tid = self._task("epochs", "training (epochs)", data["epochs"])
        detail = f"loss {data['train_loss']:.3f}  val AUROC {num(data.get('val_auroc'))}"
        self.progress.update(tid, completed=data["epoch"], detail=detail)

    def _screen_start(self, data: dict[str, Any]) -> None:
        self._screen_started = time.monotonic()
        tid = self._task("screen", "screening", data.get("total"))
        self.progress.update(tid, total=data.get("total"), detail=f"run {data['run_id']}")

    def _screen_shard(self, data: dict[str, Any]) -> None:
        c = data.get("counts", {})
        rate = data["seen"] / max(time.monotonic() - self._screen_started, 1e-6)
        self.progress.update(
            self._task("screen", "screening"),
            completed=data["seen"],
            detail=f"predicted {c.get('predicted', 0)} skipped {c.get('skipped', 0)} "
            f"failed {c.get('failed', 0)} ({rate:.1f} files/s)",
        )

    _handlers: ClassVar[dict[str, Callable[[PipelineProgress, dict[str, Any]], None]]] = {
        "demo-stage": _demo_stage,
        "train-data": _train_data,
        "train-epoch": _train_epoch,
        "train-done": lambda self, data: self.finish("epochs"),
        "start": _screen_start,
        "shard": _screen_shard,
        "done": lambda self, data: self.finish("screen"),
    }


def peak_memory() -> dict[str, float]:
    """Peak RSS of this process (inference, shards in flight, database writes), MB.

    The decode workers are not included: they hold one chunk of one shard each.
    """
    import resource

    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_with_progress(flow_fn: Callable[..., dict[str, Any]], **params: Any) -> dict[str, Any]:
    """Run a screening flow in this process under a progress bar; its summary plus peak RSS.

    A fatal error ends the command with one line (see :func:`fail`).
    """
    with exit_on_error(), PipelineProgress(transient=True):
        summary = flow_fn(**params)
    return {**summary, **peak_memory()}


# --- tables ------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ("files_seen", "predicted", "skipped", "failed", "seconds", "images_per_second")


def num(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` places, None and NaN as ``n/a``."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_summary(summary: dict[str, Any], as_json: bool = False) -> None:
    """A screening run's summary: counts and throughput, then the top skip/failure reasons
    (``as_json``: one JSON object on stdout instead, for scripts)."""
    if as_json:
        sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
        return
    table = Table(title=f"Run {summary['run_id']} — {summary['model']}", show_lines=False)
    for col in SUMMARY_COLUMNS:
        table.add_column(col.replace("_", " "), justify="right")
    table.add_row(*(str(summary[c]) for c in SUMMARY_COLUMNS))
    console.print(table)
    if summary.get("top_reasons"):
        reasons = Table(title="Why files were skipped or failed (top 10)")
        reasons.add_column("files", justify="right")
        reasons.add_column("reason", overflow="fold")
        for r in summary["top_reasons"]:
            reasons.add_row(str(r["files"]), r["reason"])
        console.print(reasons)


def frame_table(title: str, rows: list[dict[str, Any]], columns: dict[str, str]) -> Table:
    """A table of ``rows`` showing ``columns`` ({key: header})."""
    table = Table(title=title)
    for header in columns.values():
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(num(row.get(key)) for key in columns))
    if not rows:
        table.add_row(*(["(none)"] + [""] * (len(columns) - 1)))
    return table


def training_table(summary: dict[str, Any]) -> Table:
    """A trained checkpoint and its validation metrics."""
    ds, c = summary["dataset"], summary["confusion"]
    per_split, studies = ds["per_split"], ds["studies_per_split"]
    rows = {
        "checkpoint": f"{summary['checkpoint']} (sha256 {summary['sha256'][:12]}…)",
        "classes": f"{', '.join(summary['class_names'])} (positive: {summary['positive_class']})",
        "files": f"seen {ds['files_seen']}: used {ds['used']}, skipped {ds['skipped']}, "
        f"failed {ds['failed']}",
        "train split": f"{per_split['train']} from {studies['train']} studies",
        "validation split": f"{per_split['validation']} from {studies['validation']} studies "
        "(no study in both)",
        "validation AUROC": num(summary["auroc"]),
        "threshold": f"{num(summary['threshold'], 4)} (chosen on validation)",
        "at threshold": f"sensitivity {num(summary['sensitivity'])}, specificity "
        f"{num(summary['specificity'])} (TP {c['tp']} FN {c['fn']} FP {c['fp']} TN {c['tn']})",
        "epochs": f"best {summary['best_epoch']} of {summary['epochs_run']} "
        f"({summary['train_seconds']} s)",
        "database": f"model_id {summary['model_id']}, train run {summary['run_id']}",
    }
    table = Table(title=f"Model {summary['name']} {summary['version']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for key, value in rows.items():
        table.add_row(key, value)
    return table
