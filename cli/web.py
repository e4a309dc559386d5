"""``cxr-screen web``: serve the review page; ``cxr-screen web adduser NAME``: add a login."""

from __future__ import annotations

import ipaddress
import sys
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="The review web page: a worklist of flagged studies, one-key decisions, a dashboard.",
    invoke_without_command=True,
    no_args_is_help=False,
)
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.callback()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on (default: $CXR_SCREEN_WEB_HOST or 127.0.0.1)"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080)")] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Database URL (default: $CXR_SCREEN_WEB_DATABASE_URL, "
            "else $CXR_SCREEN_DATABASE_URL)",
        ),
    ] = None,
) -> None:
    """Serve the review page (uvicorn). Sign in with a login from `cxr-screen web adduser`."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn
    from pydantic import ValidationError

    from web.settings import get_web_settings

    try:
        settings = get_web_settings(web_host=host, web_port=port, web_database_url=db)
    except ValidationError as exc:
        _fail(str(exc).replace("\n", " "))
    from web.app import create_app

    try:
        app = create_app(settings)
    except Exception as exc:  # database unreachable, schema too new...
        _fail(f"cannot open the results database: {exc}")
    if not _loopback(settings.web_host) and not settings.web_tls_certfile:
        console.print(
            f"[yellow]warning:[/] listening on {settings.web_host} without TLS; put a "
            "TLS-terminating proxy in front and set CXR_SCREEN_WEB_SECURE_COOKIES=true"
        )
    scheme = "https" if settings.web_tls_certfile else "http"
    console.print(f"review page on {scheme}://{settings.web_host}:{settings.web_port}/")
    uvicorn.run(
        app,
        host=settings.web_host,
        port=settings.web_port,
        proxy_headers=False,  # the peer address is the TCP peer: proxies are trusted by address
        server_header=False,
        ssl_certfile=str(settings.web_tls_certfile) if settings.web_tls_certfile else None,
        ssl_keyfile=str(settings.web_tls_keyfile) if settings.web_tls_keyfile else None,
        log_level="info",
        access_log=False,  # URLs carry study UIDs
    )


def _read_password() -> str:
    if sys.stdin.isatty():
        return typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    line = sys.stdin.readline()
    return line.rstrip("\r\n")


@app.command("adduser")
def adduser(
    name: Annotated[str, typer.Argument(help="User name; recorded as the reviewer")],
    update: Annotated[
        bool, typer.Option("--update", help="Set a new password for an existing user")
    ] = False,
    db: Annotated[
        str | None, typer.Option("--db", help="Database URL (default: settings; as its owner)")
    ] = None,
) -> None:
    """Add a login for the review page (password: a prompt, or standard input's first line)."""
    from flows.settings import get_settings
    from sql.db import connect
    from web.auth import UserError, add_user, check_password, check_username

    try:
        check_username(name)
        password = check_password(_read_password())
    except UserError as exc:
        _fail(str(exc))
    engine = connect(db or get_settings().database_url)
    try:
        done = add_user(engine, name, password, update=update)
    except UserError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    console.print(f"user {name} {done}")


@app.command("disable")
def disable(
    name: Annotated[str, typer.Argument(help="User name")],
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: settings)")] = None,
) -> None:
    """Stop a login from signing in (its open sessions end at their next request)."""
    from flows.settings import get_settings
    from sql.db import connect
    from web.auth import UserError, disable_user

    engine = connect(db or get_settings().database_url)
    try:
        disable_user(engine, name)
    except UserError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    console.print(f"user {name} disabled")
