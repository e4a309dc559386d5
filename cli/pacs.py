"""``cxr-screen pacs``: set up and check the connection to a PACS.

- ``pacs list``: the configured PACS entries (address, our AE title, kind of credentials, TLS),
  never a secret.
- ``pacs echo NAME``: C-ECHO (DIMSE) or a QIDO-RS ping (DICOMweb); one line either way.
- ``pacs query NAME --study-date D``: how many CR/DX studies, series and instances the PACS
  has for a date or range (counts only, nothing is retrieved, no patient data shown).

Entries come from the file named by ``CXR_SCREEN_PACS_CONFIG`` and from
``CXR_SCREEN_PACS__<NAME>__<FIELD>`` variables (the environment or ``./.env``); see
``tasks/dicom/pacs/config.py`` and the README's "Connecting to the PACS".
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from cli.console import fail

app = typer.Typer(help="Connect to a PACS: list, echo, count.", no_args_is_help=True)


def load_config():
    """The PACS configuration from the environment, with ``./.env`` underneath it (as the
    settings read it); a configuration error is one line and exit 2."""
    from dotenv import dotenv_values

    from tasks.dicom.pacs.config import PacsConfigError, load_pacs_config

    environ = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    environ.update(os.environ)
    try:
        return load_pacs_config(environ)
    except PacsConfigError as exc:
        fail(str(exc))


def resolve(name: str, timeout: float | None = None):
    from tasks.dicom.pacs.config import PacsConfigError, with_overrides

    config = load_config()
    try:
        entry = config.resolve(name)
    except PacsConfigError as exc:
        fail(str(exc))
    return with_overrides(entry, timeout=timeout)


@app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per entry")] = False,
) -> None:
    """The configured PACS entries (no secrets)."""
    config = load_config()
    rows = []
    for entry in sorted(config.entries.values(), key=lambda e: e.name):
        address = (
            entry.url if entry.kind == "dicomweb" else f"{entry.aet}@{entry.host}:{entry.port}"
        )
        auth = {"basic": f"basic ({entry.username})", "bearer": "bearer token"}.get(
            entry.auth_kind, "none"
        )
        tls = (
            ""
            if entry.kind == "dimse" and not entry.tls
            else (
                "verify" + (f" with {entry.ca_bundle}" if entry.ca_bundle else "")
                if entry.verify_tls
                else "NOT VERIFIED"
            )
        )
        retrieve = ""
        if entry.kind == "dimse":
            retrieve = "C-GET" if entry.retrieve == "get" else f"C-MOVE to port {entry.move_port}"
        rows.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "address": address,
                "our_aet": entry.calling_aet,
                "auth": auth,
                "tls": tls,
                "retrieve": retrieve,
                "connections": entry.connections,
            }
        )
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    if not rows:
        typer.echo(
            "no PACS configured (set CXR_SCREEN_PACS_CONFIG to a file, or "
            "CXR_SCREEN_PACS__<NAME>__URL)"
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for column in ("name", "kind", "address", "our AE", "auth", "TLS", "retrieve", "conn."):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


@app.command("echo")
def echo_command(
    name: Annotated[str, typer.Argument(help="A configured PACS name (or a PACS URL)")],
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds to wait (default: the entry's)")
    ] = None,
) -> None:
    """C-ECHO (DIMSE) or a QIDO-RS ping (DICOMweb): is the PACS there and does it accept us?"""
    from tasks.dicom.pacs.common import PacsError
    from tasks.dicom.pacs.source import echo

    entry = resolve(name, timeout)
    try:
        result = echo(entry)
    except PacsError as exc:
        fail(str(exc))
    typer.echo(f"{entry.describe()}: {result.method} OK in {result.seconds * 1000:.0f} ms")


@app.command("query")
def query_command(
    name: Annotated[str, typer.Argument(help="A configured PACS name (or a PACS URL)")],
    study_date: Annotated[
        str | None,
        typer.Option(help="A date (2026-11-28) or a range (2026-11-01..2026-11-28)"),
    ] = None,
    since: Annotated[str | None, typer.Option(help="Studies from this date to today")] = None,
    modality: Annotated[
        list[str] | None, typer.Option(help="Modalities, one query each (default CR and DX)")
    ] = None,
    series: Annotated[
        bool, typer.Option(help="Also list series and instances (one query per study)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The counts as one JSON object")] = False,
) -> None:
    """Count the studies (and, with --series, series and instances) a PACS has for a window;
    nothing is retrieved."""
    import datetime as dt

    from tasks.dicom.pacs.common import PacsError, body_part_wanted
    from tasks.dicom.pacs.source import (
        DEFAULT_BODY_PARTS,
        RetrievalReport,
        find_studies,
        make_client,
    )

    window = study_window(study_date, since, dt.date.today())
    entry = resolve(name)
    modalities = tuple(m.upper() for m in modality) if modality else ("CR", "DX")
    report = RetrievalReport(entry.name)
    client = make_client(entry)
    counts: dict[str, object] = {"pacs": entry.name, "window": str(window)}
    try:
        studies = find_studies(client, window, modalities, report)
        counts["studies"] = len(studies)
        counts["queries"] = report.queries
        if series:
            kept = filtered = instances = announced = 0
            for study in studies:
                for s in client.find_series(study.study_uid):
                    wanted = (s.modality or "").upper() in modalities and body_part_wanted(
                        s.body_part, DEFAULT_BODY_PARTS
                    )
                    if not wanted:
                        filtered += 1
                        continue
                    kept += 1
                    announced += s.announced or 0
                    instances += len(client.find_instances(s))
            counts.update(
                series_selected=kept,
                series_filtered=filtered,
                instances_listed=instances,
                instances_announced=announced,
            )
    except PacsError as exc:
        fail(str(exc))
    finally:
        client.close()
    if report.truncated:
        counts["capped"] = report.truncated
    if as_json:
        sys.stdout.write(json.dumps(counts) + "\n")
        return
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))


def study_window(study_date: str | None, since: str | None, today):
    """The --study-date / --since options as a window; exactly one must be given."""
    from tasks.dicom.pacs.common import StudyWindow

    if (study_date is None) == (since is None):
        fail("give exactly one of --study-date DATE[..DATE] and --since DATE")
    try:
        if study_date is not None:
            return StudyWindow.parse(study_date)
        first = StudyWindow.parse(since).first
        return StudyWindow.since(first, today)
    except ValueError as exc:
        fail(str(exc))
