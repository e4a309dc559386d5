"""``cxr-screen serve``: the nightly schedule for a user with no Prefect infrastructure.

Prefect's temporary server (the one a plain flow call starts by itself) has no scheduler, so a
schedule needs a real Prefect server plus something that executes the runs. ``serve`` provides
both on one machine:

1. If no ``PREFECT_API_URL`` is configured, start a full local Prefect server (scheduler and UI
   on, ``cli.server.LocalPrefectServer``) on a free loopback port or ``--port``, with its
   SQLite database under ``PREFECT_HOME``, or ``<home>/prefect`` of this tool when
   ``PREFECT_HOME`` is not set; wait until ``/api/health`` answers. A configured server is used
   as it is.
2. ``prefect.serve`` the deployments, in a runner process: ``nightly`` on the cron schedule and
   timezone from the settings (or ``--cron`` / ``--timezone``, or ``--interval`` seconds),
   ``reprocess`` and ``train`` without schedules, to be started from the UI or ``prefect
   deployment run``.
3. On Ctrl-C or SIGTERM: stop serving (schedules are paused until the next ``serve``), then stop
   the server. No tracebacks. Both children die with ``serve`` even when it is killed.

Users with a Prefect server and workers deploy ``prefect.yaml`` instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import zoneinfo
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.console import console, err_console, exit_on_error, quiet_prefect_defaults
from cli.server import (
    HOST,
    LocalPrefectServer,
    free_port,
    is_healthy,
    log_tail,
    port_is_free,
    spawn,
    stop_process_group,
)
from flows.errors import UserError


def say(text: str) -> None:
    """A line for the person at the terminal (never wrapped: paths and URLs stay whole)."""
    console.print(text, soft_wrap=True)


class ServeError(UserError):
    """A problem that stops ``serve`` from starting (bad schedule, no model, server down)."""


@dataclass
class Schedule:
    """The nightly deployment's schedule: a cron expression or a fixed interval, in a timezone."""

    timezone: str
    cron: str | None = None
    interval: float | None = None

    def describe(self) -> str:
        if self.interval is not None:
            return f"every {self.interval:g} s ({self.timezone})"
        return f"cron '{self.cron}' ({self.timezone})"

    def to_prefect(self):
        from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

        if self.interval is not None:
            return IntervalSchedule(
                interval=timedelta(seconds=self.interval), timezone=self.timezone
            )
        return CronSchedule(cron=self.cron, timezone=self.timezone)


def make_schedule(
    cron: str | None, timezone: str | None, interval: float | None, *, settings
) -> Schedule:
    """Validate the schedule options up front, naming the value and the rule when one is bad."""
    tz = timezone or settings.timezone
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ServeError(
            f"a timezone of {tz!r} is invalid, it must be an IANA name such as 'UTC' or "
            "'Europe/Berlin'"
        ) from None
    if interval is not None:
        if cron is not None:
            raise ServeError("--cron and --interval both given: pick one schedule")
        if not interval > 0:
            raise ServeError(f"an --interval of {interval:g} s is invalid, it must be above 0")
        return Schedule(timezone=tz, interval=float(interval))
    expression = cron or settings.nightly_cron
    from pydantic import ValidationError

    schedule = Schedule(timezone=tz, cron=expression)
    try:
        schedule.to_prefect()
    except ValidationError as exc:
        reason = exc.errors()[0].get("msg", str(exc))
        raise ServeError(
            f"a cron expression of {expression!r} is invalid ({reason}); it must have five "
            "fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *'"
        ) from None
    return schedule


def deployments(
    schedule: Schedule,
    *,
    drop_folder: str,
    model: str,
) -> list[Any]:
    """The three deployments, with module entrypoints so any working directory works."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from flows.screen import nightly, screen
    from flows.train import train

    module = EntrypointType.MODULE_PATH
    return [
        nightly.to_deployment(
            "nightly",
            schedule=schedule.to_prefect(),
            parameters={"drop_folder": drop_folder, "model": model},
            # A night still running when the next one is due: skip the new one.
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            description=f"Screen new files in {drop_folder}, {schedule.describe()}",
            tags=["cxr-screen", "nightly"],
            entrypoint_type=module,
        ),
        screen.to_deployment(
            "reprocess",
            parameters={"model": model},
            description="Screen an archive or folder on demand (parameters: sources, model, and "
            "params: force, ...)",
            tags=["cxr-screen", "reprocess"],
            entrypoint_type=module,
        ),
        train.to_deployment(
            "train",
            description="Train a checkpoint from a folder of labelled studies",
            tags=["cxr-screen", "train"],
            entrypoint_type=module,
        ),
    ]


def run_deployments(spec_json: str) -> None:
    """The runner process: ``prefect.serve`` the deployments until SIGTERM.

    ``serve`` starts it in its own session, so a terminal's Ctrl-C reaches only ``serve``, which
    turns it into SIGTERM here: Prefect's runner then cancels in-flight runs and pauses the
    schedules cleanly (a SIGINT would also hit the flow-run processes and print tracebacks).
    """
    quiet_prefect_defaults()
    spec = json.loads(spec_json)
    schedule = Schedule(**spec["schedule"])
    try:
        served = deployments(schedule, drop_folder=spec["drop_folder"], model=spec["model"])
    except ImportError as exc:
        # not under Typer (``python -c``): the one-line error by hand
        err_console.print(
            f"[bold red]error:[/] cannot load the flows: {exc}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    import prefect

    say(
        f"Serving nightly ({schedule.describe()}), reprocess and train. Start an ad hoc run "
        "with\n  prefect deployment run screen/reprocess --param sources='[\"/path/to/archive\"]'"
        "\nPress Ctrl-C to stop."
    )
    prefect.serve(*served, print_starting_message=False, limit=spec["limit"])


def _check_database(url: str) -> None:
    """Fail at start-up, not at 02:00, when the results database is unreachable."""
    import sqlalchemy as sa

    from sql.db import connect

    try:
        connect(url).dispose()
    except sa.exc.SQLAlchemyError as exc:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ServeError(f"the results database {shown} is unreachable: {first}") from None


def _plan(
    *,
    cron: str | None,
    timezone: str | None,
    interval: float | None,
    drop_folder: str | os.PathLike[str] | None,
    model: str | os.PathLike[str] | None,
    port: int | None,
    limit: int | None,
    settings,
) -> dict[str, Any]:
    """Check every option before anything starts; what the runner process needs, as JSON."""
    schedule = make_schedule(cron, timezone, interval, settings=settings)
    folder = drop_folder or settings.drop_folder
    if not folder:
        raise ServeError("no drop folder: pass --drop-folder or set CXR_SCREEN_DROP_FOLDER")
    if not Path(folder).is_dir():
        raise ServeError(f"the drop folder {folder} does not exist or is not a folder")
    model_path = model or settings.model_path
    if not model_path:
        raise ServeError("no model given: pass --model PATH or set CXR_SCREEN_MODEL_PATH")
    if not Path(model_path).is_file():
        raise ServeError(f"the model file {model_path} does not exist")
    if port is not None and not 0 < port < 65536:
        raise ServeError(f"a --port of {port} is invalid, it must be 1 to 65535")
    if limit is not None and limit < 1:
        raise ServeError(f"a --limit of {limit} is invalid, it must be 1 or more")
    return {
        "schedule": dataclasses.asdict(schedule),
        "drop_folder": str(Path(folder).resolve()),
        "model": str(Path(model_path).resolve()),
        "limit": limit,
    }


def _prefect_api(
    settings, port: int | None, startup_timeout: float
) -> tuple[str, LocalPrefectServer | None]:
    """The configured Prefect server if there is one (it must answer), else a local one."""
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if api_url:
        if not is_healthy(api_url, timeout=10):
            raise ServeError(
                f"the Prefect server at PREFECT_API_URL={api_url} does not answer "
                f"{api_url.rstrip('/')}/health; start it, or unset PREFECT_API_URL to let "
                "serve start a local one"
            )
        say(f"Using the Prefect server at {api_url}")
        return api_url, None
    if port is not None and not port_is_free(port):
        raise ServeError(f"port {port} on {HOST} is in use; pick another with --port")
    home = Path(os.environ.get("PREFECT_HOME") or settings.home / "prefect").resolve()
    server = LocalPrefectServer(
        temporary=False, home=home, port=port or free_port(), startup_timeout=startup_timeout
    )
    say(f"Starting a local Prefect server (SQLite under {home}) ...")
    server.start().wait_ready()
    say(
        f"Prefect server and UI at {server.api_url.removesuffix('/api')} (log: {server.log_path})",
    )
    return server.api_url, server


def _start_runner(api_url: str, database_url: str, spec: dict[str, Any]) -> subprocess.Popen:
    """The process that serves the deployments; flow runs are its children and inherit the
    API and the database from its environment."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "CXR_SCREEN_DATABASE_URL": database_url}
    code = "import sys, cli.serve as s; s.run_deployments(sys.argv[1])"
    return spawn(
        [sys.executable, "-c", code, json.dumps(spec)],
        what="the deployments' runner",
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _watch(runner: subprocess.Popen, server: LocalPrefectServer | None) -> None:
    """Wait while serving; raise ServeError when the runner or the server stops by itself."""
    while runner.poll() is None:
        if server is not None and server.exited():
            raise ServeError(
                f"the local Prefect server stopped (exit code {server.process.returncode}); "
                f"its log ({server.log_path}) ends with: {log_tail(server.log_path)}"
            )
        time.sleep(1)
    raise ServeError(f"serving stopped by itself with exit code {runner.returncode}")


class _Hurry:
    """Set by a second Ctrl-C / SIGTERM while ``serve`` is stopping: stop waiting, kill."""

    requested = False

    @classmethod
    def handler(cls, signum, frame) -> None:
        cls.requested = True

    @classmethod
    def now(cls) -> bool:
        return cls.requested


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _shut_down(runner: subprocess.Popen | None, server: LocalPrefectServer | None) -> None:
    """Stop serving, then the server; a second Ctrl-C (or SIGTERM) shortens the waits but
    never skips them."""
    previous_sigint = signal.signal(signal.SIGINT, _Hurry.handler)
    previous_sigterm = signal.signal(signal.SIGTERM, _Hurry.handler)
    try:
        if runner is not None:
            if runner.poll() is None:
                say(
                    "Stopping: cancelling runs in progress, pausing the schedule "
                    "(Ctrl-C again to kill them at once) ..."
                )
            stop_process_group(runner, grace=60, hurry=_Hurry.now)
        if server is not None:
            say("Stopping the local Prefect server ...")
            server.stop(grace=30, hurry=_Hurry.now)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
        _Hurry.requested = False


def serve(
    *,
    cron: str | None = None,
    timezone: str | None = None,
    interval: float | None = None,
    drop_folder: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    database_url: str | None = None,
    port: int | None = None,
    limit: int | None = 2,
    startup_timeout: float = 180.0,
    listen_port: int | None = None,
    listen_ae: str = "CXRSCREEN",
) -> None:
    """Serve the nightly, reprocess and train deployments until Ctrl-C or SIGTERM.

    ``listen_port``: also run the C-STORE receiver (``cxr-screen listen``) on that port, as
    ``listen_ae``, writing into the drop folder the nightly run reads.

    Starts a local Prefect server first when ``PREFECT_API_URL`` is not configured. ``limit``
    caps the flow runs executing at once; the nightly deployment never overlaps itself.
    Raises ``ServeError`` (or ``LocalServerError``) with a one-line reason when it cannot start
    or serving dies.
    """
    from flows.settings import get_settings

    quiet_prefect_defaults()
    settings = get_settings(database_url=database_url)
    spec = _plan(
        cron=cron,
        timezone=timezone,
        interval=interval,
        drop_folder=drop_folder,
        model=model,
        port=port,
        limit=limit,
        settings=settings,
    )
    _check_database(settings.database_url)
    # SIGTERM (a service manager stopping us) takes the same clean path as Ctrl-C.
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    server: LocalPrefectServer | None = None
    runner: subprocess.Popen | None = None
    receiver = None
    try:
        if listen_port is not None:
            from cli.listen import start_receiver

            receiver = start_receiver(spec["drop_folder"], listen_port, listen_ae)
        api_url, server = _prefect_api(settings, port, startup_timeout)
        runner = _start_runner(api_url, settings.database_url, spec)
        _watch(runner, server)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            _shut_down(runner, server)
            if receiver is not None:
                receiver.stop()
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
    say("Stopped.")


def serve_command(
    cron: Annotated[
        str | None,
        typer.Option(
            "--cron",
            help="Cron expression for the nightly run (default: CXR_SCREEN_NIGHTLY_CRON or "
            "'0 2 * * *')",
        ),
    ] = None,
    timezone: Annotated[
        str | None,
        typer.Option(
            "--timezone", help="IANA timezone of the schedule (default: CXR_SCREEN_TIMEZONE or UTC)"
        ),
    ] = None,
    interval: Annotated[
        float | None,
        typer.Option(
            "--interval", help="Run the nightly flow every SECONDS instead of on the cron"
        ),
    ] = None,
    drop_folder: Annotated[
        Path | None,
        typer.Option("--drop-folder", help="Folder the nightly run scans (CXR_SCREEN_DROP_FOLDER)"),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model checkpoint (CXR_SCREEN_MODEL_PATH)")
    ] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="Results database URL (CXR_SCREEN_DATABASE_URL)")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", help="Port of the local Prefect server (default: a free one)"),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Flow runs executing at once")] = 2,
    listen_port: Annotated[
        int | None,
        typer.Option(
            "--listen-port", help="Also receive C-STORE pushes on this port into the drop folder"
        ),
    ] = None,
    listen_ae: Annotated[
        str, typer.Option("--listen-ae", help="The receiver's AE title")
    ] = "CXRSCREEN",
) -> None:
    """Run the nightly schedule (and on-demand reprocess/train) with a local Prefect server."""
    with exit_on_error():
        serve(
            cron=cron,
            timezone=timezone,
            interval=interval,
            drop_folder=drop_folder,
            model=model,
            database_url=db,
            port=port,
            limit=limit,
            listen_port=listen_port,
            listen_ae=listen_ae,
        )


if __name__ == "__main__":
    typer.run(serve_command)
