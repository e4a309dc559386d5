"""``cxr-screen publish``: send study results to a PACS as DICOM Structured Reports.

By default every study result not yet sent (``v_unpublished``: never sent successfully, or
changed since) goes to the named PACS, oldest first; ``--study``, ``--model-name``,
``--model-version`` and ``--limit`` narrow it, ``--all`` sends again what was sent (same SR
UIDs: the PACS replaces or keeps its copy, it never gets a second one). Every attempt is
recorded in the ``publications`` table. ``screen --write-back PACS`` calls the same code after
its run (:func:`write_back`).

Exit status 0 when the batch completed (failed studies are recorded with their reasons and
counted in the summary), 2 with one line when it could not (PACS unreachable, credentials or
AE title refused, database unreachable).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from cli.console import console, exit_on_error, fail

SR_CLASSES = {
    "3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
}


def publish(
    pacs: str,
    database_url: str | None,
    *,
    study_uids: list[str] | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    model_ids: list[int] | None = None,
    unpublished_only: bool = True,
    limit: int | None = None,
    sr_class: str = "3d",
    institution: str | None = None,
) -> dict[str, Any]:
    """Publish to ``pacs`` (a configured name or a PACS URL); returns the summary as a dict.
    Fatal errors end the command with one line (``fail``)."""
    from cli.pacs import resolve
    from flows.settings import get_settings
    from sql.db import connect, session_factory
    from sql.publications import find_models
    from tasks.dicom.pacs.common import PacsError
    from tasks.publish.destinations import make_destination
    from tasks.publish.publish import publish_results

    if sr_class not in SR_CLASSES:
        fail(f"--sr-class {sr_class!r} is not one of {', '.join(SR_CLASSES)}")
    entry = resolve(pacs)
    with exit_on_error():
        sessions = session_factory(connect(get_settings(database_url=database_url).database_url))
        if model_ids is None and (model_name or model_version):
            with sessions.begin() as session:
                model_ids = find_models(session, name=model_name, version=model_version)
            if not model_ids:
                fail(
                    f"no model named {model_name or '(any)'} version {model_version or '(any)'} "
                    "is registered in the results database"
                )
    destination = make_destination(entry)
    try:
        summary = publish_results(
            sessions,
            destination,
            model_ids=model_ids,
            study_uids=study_uids,
            unpublished_only=unpublished_only,
            limit=limit,
            sop_class_uid=SR_CLASSES[sr_class],
            institution_name=institution,
            software_version=_software_version(),
        )
    except PacsError as exc:
        fail(str(exc))
    except Exception as exc:
        from cli.console import fatal_reason

        fail(fatal_reason(exc))
    finally:
        destination.close()
    return summary.as_dict()


def write_back(pacs: str, database_url: str | None, run_id: int) -> dict[str, Any]:
    """After a screening run: publish what is unpublished for the run's model version."""
    from flows.settings import get_settings
    from sql.db import connect, session_factory
    from sql.publications import run_model_id

    with exit_on_error():
        sessions = session_factory(connect(get_settings(database_url=database_url).database_url))
        with sessions.begin() as session:
            model_id = run_model_id(session, run_id)
    return publish(pacs, database_url, model_ids=[model_id])


def check_write_back(pacs: str | None) -> None:
    """``--write-back PACS`` of screen/nightly: the PACS must be configured before the run."""
    if pacs:
        from cli.pacs import resolve

        resolve(pacs)


def report_run(
    summary: dict[str, Any], pacs: str | None, database_url: str | None, as_json: bool
) -> None:
    """A screening run's summary, after publishing its model's unpublished results to ``pacs``
    when ``--write-back`` was given (its summary under ``write_back`` in the JSON)."""
    from cli.console import print_summary

    if pacs:
        summary = {**summary, "write_back": write_back(pacs, database_url, summary["run_id"])}
    print_summary(summary, as_json)
    if pacs and not as_json:
        print_publish_summary(summary["write_back"])


def print_publish_summary(summary: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
        return
    line = (
        f"published to {summary['destination']}: {summary['considered']} study result(s), "
        f"{summary['sent']} sent, {summary['failed']} failed"
    )
    if summary["fallback_comprehensive"]:
        line += f" ({summary['fallback_comprehensive']} as Comprehensive SR after a refusal)"
    console.print(line, highlight=False)
    if summary["top_reasons"]:
        from rich.table import Table

        table = Table(title="Why studies were not published (top 10)")
        table.add_column("studies", justify="right")
        table.add_column("reason", overflow="fold")
        for r in summary["top_reasons"]:
            table.add_row(str(r["studies"]), r["reason"])
        console.print(table)


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"cxr-screen {version('cxr-screen')}"
    except PackageNotFoundError:
        return "cxr-screen"


def publish_command(
    pacs: Annotated[str, typer.Option("--pacs", help="A configured PACS name (or a PACS URL)")],
    study: Annotated[
        list[str] | None, typer.Option("--study", help="Only this Study Instance UID (repeatable)")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="Only this model's results")] = None,
    model_version: Annotated[str | None, typer.Option(help="Only this model version")] = None,
    all_results: Annotated[
        bool,
        typer.Option(
            "--all", help="Also results already sent (same SR UIDs: the PACS replaces them)"
        ),
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many results")] = None,
    sr_class: Annotated[
        str,
        typer.Option(
            help="3d (Comprehensive 3D SR, Comprehensive SR when refused) or comprehensive"
        ),
    ] = "3d",
    institution: Annotated[
        str | None, typer.Option(help="Institution Name written in the SR")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object")
    ] = False,
) -> None:
    """Send study results to a PACS as DICOM SRs (TID 1500), and record each attempt."""
    summary = publish(
        pacs,
        db,
        study_uids=study or None,
        model_name=model_name,
        model_version=model_version,
        unpublished_only=not all_results,
        limit=limit,
        sr_class=sr_class,
        institution=institution,
    )
    print_publish_summary(summary, as_json)


if __name__ == "__main__":
    typer.run(publish_command)
