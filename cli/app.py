"""The ``cxr-screen`` command line: the Typer app, its global options, and the registry of
commands. Each command group lives in a module of its own (``cli/<group>.py``); this module
only registers them, so adding a command is one line below.

Every module here imports Prefect, torch and the flows only when one of its commands runs:
``cxr-screen --help`` and each command's ``--help`` stay fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli import db, demo, fanout, listen, model, pacs, publish, query, screen, serve, train, web
from cli.console import DEBUG_ENV, enable_debug

app = typer.Typer(
    name="cxr-screen",
    help="Batch screening of chest radiographs: DICOM in, predictions in SQL out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def global_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar=DEBUG_ENV,
            help="Print the traceback behind a fatal error",
        ),
    ] = False,
) -> None:
    if debug:
        enable_debug()


# --- commands: one line each, in the order --help lists them ----------------------------------

app.command("screen")(screen.screen_command)
app.command("nightly")(screen.nightly_command)
app.command("train")(train.train_command)
app.command("demo")(demo.demo_command)
app.command("serve")(serve.serve_command)
app.command("query")(query.query_command)
app.command("review")(query.review_command)
app.add_typer(model.app, name="model")
app.add_typer(db.app, name="db")
app.add_typer(fanout.app, name="fanout")
app.add_typer(web.app, name="web")
# (the web page and PACS commands register here)
app.command("listen")(listen.listen_command)
app.command("publish")(publish.publish_command)
app.add_typer(pacs.app, name="pacs")


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
