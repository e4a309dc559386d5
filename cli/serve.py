"""``cxr-screen serve``: the nightly schedule for a user with no Prefect infrastructure.

Prefect's temporary server (the one a plain flow call starts by itself) has no scheduler, so a
schedule needs a real ``prefect server start`` plus something that executes the runs. ``serve``
provides both on one machine:

1. If no ``PREFECT_API_URL`` is configured, start ``prefect server start`` as a child process on
   a free loopback port (SQLite database under ``PREFECT_HOME``, or ``<home>/prefect`` of this
   tool when ``PREFECT_HOME`` is not set), wait until ``/api/health`` answers, and point
   ``PREFECT_API_URL`` at it. A configured server is used as it is.
2. ``prefect.serve`` the deployments: ``nightly`` on the cron schedule and timezone from the
   settings (or ``--cron`` / ``--timezone``, or ``--interval`` seconds), ``reprocess`` and
   ``train`` without schedules, to be started from the UI or ``prefect deployment run``.
3. On Ctrl-C or SIGTERM: stop serving (schedules are paused until the next ``serve``), then stop
   the child server. No tracebacks.

Users with a Prefect server and workers deploy ``prefect.yaml`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zoneinfo
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from flows.common import quiet_prefect_defaults
from flows.settings import get_settings

HOST = "127.0.0.1"
SERVER_LOG_NAME = "cxr-screen-server.log"

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class ServeError(RuntimeError):
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


def free_port(host: str = HOST) -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when ``GET <api_url>/health`` answers 200 (Prefect's own health route)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


def _child_command(argv: list[str]) -> list[str]:
    """``argv`` run through a small trampoline that, on Linux, asks the kernel to SIGTERM the
    child when ``serve`` dies without cleaning up (e.g. SIGKILL), so nothing is left behind."""
    return [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *argv]


_TRAMPOLINE = """\
import os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(0)
os.execv(argv[0], argv)
"""


class _Hurry:
    """Set by a second Ctrl-C / SIGTERM while ``serve`` is stopping: stop waiting, kill."""

    requested = False

    @classmethod
    def handler(cls, signum, frame) -> None:
        cls.requested = True


def _stop_process_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the leader of ``process``'s group, wait up to ``grace`` seconds (less after a
    second Ctrl-C), then SIGKILL whatever is left in the group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline and not _Hurry.requested:
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


class LocalServer:
    """``prefect server start`` as a child process in its own session: Ctrl-C in a terminal does
    not reach it, so ``serve`` can stop serving (which talks to the API) before stopping it."""

    def __init__(self, prefect_home: Path, port: int, startup_timeout: float = 180.0):
        self.prefect_home = prefect_home
        self.port = port
        self.startup_timeout = startup_timeout
        self.api_url = f"http://{HOST}:{port}/api"
        self.log_path = prefect_home / SERVER_LOG_NAME
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PREFECT_HOME"] = str(self.prefect_home)
        env.pop("PREFECT_API_URL", None)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        argv = [sys.executable, "-m", "prefect", "server", "start"]
        argv += ["--host", HOST, "--port", str(self.port), "--scheduler"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                _child_command(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_healthy(self) -> None:
        """Poll ``/api/health`` until it answers, the child dies, or the timeout passes."""
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.exited():
                raise ServeError(
                    f"the local Prefect server exited with code {self.process.returncode} while "
                    f"starting; the end of its log ({self.log_path}):\n{_tail(self.log_path)}"
                )
            if is_healthy(self.api_url):
                return
            time.sleep(0.5)
        raise ServeError(
            f"the local Prefect server did not answer {self.api_url}/health within "
            f"{self.startup_timeout:g} s; the end of its log ({self.log_path}):\n"
            f"{_tail(self.log_path)}"
        )

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        if self.process is not None:
            _stop_process_group(self.process, grace=30)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


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
            parameters={"model": model, "force": False},
            description="Screen an archive or folder on demand (parameters: sources, model, force)",
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
        err_console.print(f"[bold red]error:[/] cannot load the flows: {exc}", highlight=False)
        sys.exit(2)
    import prefect

    console.print(
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
) -> None:
    """Serve the nightly, reprocess and train deployments until Ctrl-C or SIGTERM.

    Starts a local Prefect server first when ``PREFECT_API_URL`` is not configured. ``limit``
    caps the flow runs executing at once; the nightly deployment never overlaps itself.
    Raises ``ServeError`` with a one-line reason when it cannot start or serving dies.
    """
    quiet_prefect_defaults()
    settings = get_settings(database_url=database_url)
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
    _check_database(settings.database_url)
    spec = {
        "schedule": dataclasses.asdict(schedule),
        "drop_folder": str(Path(folder).resolve()),
        "model": str(Path(model_path).resolve()),
        "limit": limit,
    }

    from prefect.settings import PREFECT_API_URL

    # SIGTERM (a service manager stopping us) takes the same clean path as Ctrl-C.
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    server: LocalServer | None = None
    runner: subprocess.Popen | None = None
    try:
        api_url = PREFECT_API_URL.value()
        if api_url:
            if not is_healthy(api_url, timeout=10):
                raise ServeError(
                    f"the Prefect server at PREFECT_API_URL={api_url} does not answer "
                    f"{api_url.rstrip('/')}/health; start it, or unset PREFECT_API_URL to let "
                    "serve start a local one"
                )
            console.print(f"Using the Prefect server at {api_url}")
        else:
            if port is not None and not port_is_free(port):
                raise ServeError(f"port {port} on {HOST} is in use; pick another with --port")
            home = Path(os.environ.get("PREFECT_HOME") or settings.home / "prefect").resolve()
            server = LocalServer(home, port or free_port(), startup_timeout)
            console.print(f"Starting a local Prefect server (SQLite under {home}) ...")
            server.start()
            server.wait_healthy()
            api_url = server.api_url
            console.print(
                f"Prefect server and UI at {api_url.removesuffix('/api')} (log: {server.log_path})"
            )
        # Flow runs are children of the runner: they inherit the API and the database.
        env = dict(os.environ)
        env["PREFECT_API_URL"] = api_url
        env["CXR_SCREEN_DATABASE_URL"] = settings.database_url
        argv = [
            sys.executable,
            "-c",
            "import sys, cli.serve as s; s.run_deployments(sys.argv[1])",
        ]
        runner = subprocess.Popen(
            _child_command([*argv, json.dumps(spec)]),
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        while runner.poll() is None:
            if server is not None and server.exited():
                raise ServeError(
                    f"the local Prefect server stopped (exit code {server.process.returncode}); "
                    f"the end of its log ({server.log_path}):\n{_tail(server.log_path)}"
                )
            time.sleep(1)
        raise ServeError(f"serving stopped by itself with exit code {runner.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C (or SIGTERM) shortens the waits below but never skips them.
        previous_sigint = signal.signal(signal.SIGINT, _Hurry.handler)
        signal.signal(signal.SIGTERM, _Hurry.handler)
        try:
            if runner is not None:
                if runner.poll() is None:
                    console.print(
                        "Stopping: cancelling runs in progress, pausing the schedule "
                        "(Ctrl-C again to kill them at once) ..."
                    )
                _stop_process_group(runner, grace=60)
            if server is not None:
                console.print("Stopping the local Prefect server ...")
                server.stop()
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            signal.signal(signal.SIGTERM, previous_sigterm)
            _Hurry.requested = False
    console.print("Stopped.")


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
) -> None:
    """Run the nightly schedule (and on-demand reprocess/train) with a local Prefect server."""
    from cli.demo import exit_on_error

    with exit_on_error(ServeError, reason=str, stderr=err_console):
        serve(
            cron=cron,
            timezone=timezone,
            interval=interval,
            drop_folder=drop_folder,
            model=model,
            database_url=db,
            port=port,
            limit=limit,
        )


if __name__ == "__main__":
    typer.run(serve_command)
