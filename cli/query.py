"""``cxr-screen query`` (named SQL queries, exported) and ``cxr-screen review`` (a decision)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.console import console, exit_on_error, fail

DB_HELP = "Database URL (default: settings)"
FORMATS = ("table", "csv", "parquet")


def query_command(
    name: Annotated[str, typer.Argument(help="A query in sql/queries (see --list)")] = "",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="k=v, repeatable")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or parquet")] = "table",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout")] = None,
    db: Annotated[str | None, typer.Option("--db", help=DB_HELP)] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="List the queries and their parameters")
    ] = False,
) -> None:
    """Run a named, parameterised query from sql/queries and export the result."""
    from flows.settings import get_settings
    from sql.db import connect
    from sql.queries import run_query

    if list_ or not name:
        console.print(queries_table())
        return
    if fmt not in FORMATS:
        fail(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        fail("--format parquet needs --out FILE")
    if out is not None:
        check_out(out)
    params = parse_params(param or [])
    with exit_on_error():
        try:
            frame = run_query(connect(get_settings(database_url=db).database_url), name, params)
        except (KeyError, ValueError, TypeError) as exc:  # unknown query, bad parameter
            fail(str(exc).strip("'\""))
    export(frame, name, fmt, out)


def parse_params(items: list[str]) -> dict[str, str]:
    """``-p key=value`` options as a dict; a malformed or repeated one is a fatal error naming
    it (a query parameter has one value: keeping the last silently would answer another
    question than the one asked)."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"--param {item!r} is not of the form key=value")
        if key in params:
            fail(
                f"--param {key} is given twice ({params[key]!r} and {value!r}); "
                "a query parameter takes one value"
            )
        params[key] = value
    return params


def check_out(out: Path) -> None:
    """``--out`` must name a file in a folder that exists: checked before the query runs.
    An existing file is replaced (the export of a scheduled query is rewritten each time)."""
    if out.is_dir():
        fail(f"--out {out} is a directory; name a file in it (e.g. {out / 'result.csv'})")
    parent = out.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        fail(f"--out {out}: the folder {parent} {what}")
    if not os.access(parent, os.W_OK):
        fail(f"--out {out}: the folder {parent} is not writable")


def queries_table() -> Table:
    from sql.queries import list_queries, load_query

    table = Table(title="queries (cxr-screen query NAME -p key=value)")
    table.add_column("name")
    table.add_column("parameters")
    table.add_column("description", overflow="fold")
    for q in map(load_query, list_queries()):
        table.add_row(q.name, ", ".join(f"{p.name}:{p.type}" for p in q.params), q.description)
    return table


def export(frame, name: str, fmt: str, out: Path | None) -> None:
    """A query's result as a table, CSV or Parquet, to ``out`` or the terminal.

    A file is written next to ``out`` and renamed over it once complete: a failed export
    leaves the previous file, never half a file; an error writing it is one line.
    """
    replaced = out is not None and out.is_file()
    if out is not None:
        with exit_on_error(OSError, reason=lambda e: f"--out {out}: {e.strerror or e}"):
            _write_file(frame, fmt, out)
    elif fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    else:
        table = Table(title=f"{name} ({len(frame)} rows)")
        for col in frame.columns:
            table.add_column(str(col))
        for row in frame.itertuples(index=False):
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)
    if out:
        console.print(f"wrote {len(frame)} rows to {out}{' (replaced)' if replaced else ''}")


def _write_file(frame, fmt: str, out: Path) -> None:
    if out.exists() and not out.is_file():  # a device or a pipe (/dev/stdout): straight in
        _write(frame, fmt, out)
        return
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _write(frame, fmt, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write(frame, fmt: str, path: Path) -> None:
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        path.write_text(frame.to_string(index=False) + "\n")


def review_command(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    decision: Annotated[str, typer.Option(help="agree, disagree or uncertain")],
    reviewer: Annotated[str, typer.Option(help="Who decided")],
    note: Annotated[str | None, typer.Option(help="Free text")] = None,
    db: Annotated[str | None, typer.Option("--db", help=DB_HELP)] = None,
) -> None:
    """Record a reviewer's decision on a study's prediction."""
    from flows.settings import get_settings
    from sql.db import connect, session_factory
    from sql.reviews import add_review

    with exit_on_error():
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
        except ValueError as exc:  # an unknown study or decision: the message says which
            fail(str(exc))
    console.print(f"review {review_id} recorded: {decision} by {reviewer}")
