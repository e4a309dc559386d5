"""``cxr-screen db``: create or migrate the results database."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.console import console, exit_on_error

app = typer.Typer(help="Manage the results database.", no_args_is_help=True)


@app.command("upgrade")
def upgrade_command(
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
    reviewer_role: Annotated[
        bool, typer.Option(help="Also create the read-only reviewer role (PostgreSQL)")
    ] = False,
) -> None:
    """Create or migrate the results database to the current schema."""
    from flows.settings import get_settings
    from sql.db import apply_reviewer_role, connect, current_revision

    url = get_settings(database_url=db).database_url
    with exit_on_error():
        engine = connect(url, repair=True)  # also recreates missing or altered views
        if reviewer_role:
            apply_reviewer_role(engine)
    console.print(
        f"database at revision {current_revision(engine)}: {engine.url.render_as_string()}"
    )
