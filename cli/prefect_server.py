"""The process of a local Prefect server (``cli.server.LocalPrefectServer``): uvicorn serving
Prefect's API app, deaf to SIGINT and SIGTERM, stopped by its owner closing its stdin.

Why deaf: a terminal's Ctrl-C, systemd's stop (every process of the unit's control group) and
the like reach the server at the same moment as the command that uses it. The command then
stops its run in order, closing the run, reporting the flow run's end, draining its logs and
events, and needs the server for all of that; a server that had stopped too would leave it
retrying for minutes. So SIGINT and SIGTERM are blocked here (the owner blocks them before
exec already, so there is no window while Python starts), and the server stops when its
stdin reaches end of file: when its owner closes the pipe after its last call, or dies (the
kernel closes the pipe; on Linux it also SIGKILLs the server then, ``PR_SET_PDEATHSIG``).
Uvicorn's graceful shutdown runs on that end of file (``--graceful-timeout`` bounds it).

Usage: ``python -m cli.prefect_server --host H --port P [--log-level L] [--graceful-timeout S]``
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

APP = "prefect.server.api.server:create_app"
DEAF_TO = {signal.SIGINT, signal.SIGTERM}


def _stop_at_end_of_input(server) -> None:
    """Wait for stdin's end of file, then ask uvicorn to shut down."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    server.should_exit = True


def main(argv: list[str] | None = None) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, DEAF_TO)  # threads started later inherit it
    parser = argparse.ArgumentParser(prog="python -m cli.prefect_server")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="error")
    parser.add_argument("--graceful-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)

    import uvicorn

    config = uvicorn.Config(
        APP,
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="on",
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    server = uvicorn.Server(config)
    threading.Thread(
        target=_stop_at_end_of_input, args=(server,), name="stop-at-eof", daemon=True
    ).start()
    server.run()


if __name__ == "__main__":
    main()
