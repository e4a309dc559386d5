"""The one launcher of a local Prefect server, and child processes that die with the command.

The commands that run flows need a Prefect server of their own when no ``PREFECT_API_URL`` is
configured:

- ``screen``, ``nightly``, ``train`` and ``demo`` start a **temporary** server
  (:func:`prefect_ready`, :func:`start_local_server`): the same app Prefect's own temporary
  server runs (UI and background services off), started first thing, so that it boots on the
  second core while the command imports torch and Prefect's client; the command never imports
  Prefect's server package, and its fixed start-up drops from ~18 s to about the larger of the
  two.
- ``serve`` starts a **full** one (``temporary=False``): scheduler and UI on, on a chosen port.

Either way it is one uvicorn process running ``prefect.server.api.server:create_app`` on a
loopback port (``cli/prefect_server.py``), writing to ``$PREFECT_HOME/cxr-screen-server.log``
rather than the terminal (a start-up failure quotes that file's tail). It outlives the command's
last call to it and no more:

- it is deaf to SIGINT and SIGTERM (a session of its own, and both signals blocked), so that a
  terminal's Ctrl-C, systemd stopping the unit's whole control group or a signal to the
  command's process group stops the command's run in order while the server still answers;
- the command stops it after its flows and Prefect's own exit work (closing the server's stdin
  ends it gracefully; whatever is left after the grace period is SIGKILLed);
- if the command itself is killed, the kernel SIGKILLs it (``PR_SET_PDEATHSIG``, see
  :func:`spawn`). When the kernel cannot be asked to do that, the server is not started at
  all: the command fails with the reason instead of risking an orphan server.

At import, this module loads only the standard library (and ``flows.errors``): it must run
before Prefect and torch load.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flows.errors import UserError

__all__ = [
    "HOST",
    "LocalPrefectServer",
    "LocalServerError",
    "configured_api_url",
    "done_with_temporary_server",
    "free_port",
    "is_healthy",
    "port_is_free",
    "prefect_ready",
    "spawn",
    "start_local_server",
    "stop_process_group",
]

HOST = "127.0.0.1"
LOG_NAME = "cxr-screen-server.log"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# On top of the environment, what Prefect's own temporary server sets, and what
# ``prefect server start --scheduler`` sets for a full one.
_TEMPORARY_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}
_FULL_ENV = {
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
}


class LocalServerError(UserError):
    """A local Prefect server (or a child process that must die with us) did not start."""


# --- small helpers ------------------------------------------------------------------------------


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def free_port(host: str = HOST) -> int:
    """A loopback port nobody listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when ``GET <api_url>/health`` answers 200 (Prefect's own health route)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: Path, chars: int = 600) -> str:
    """The end of a log file on one line (`` | `` between its lines)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-chars:].replace("\n", " | ") or "(empty)"


# --- child processes that die with this one -----------------------------------------------------

_prctl: Callable[..., int] | None = None


def _load_prctl() -> Callable[..., int]:
    """libc's ``prctl``, looked up in this process (never between fork and exec)."""
    global _prctl
    if _prctl is None:
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError) as exc:
            raise LocalServerError(
                f"cannot ask the kernel to stop child processes with this one: libc's prctl "
                f"is unavailable ({exc})"
            ) from None
    return _prctl


DEAF_TO = (signal.SIGINT, signal.SIGTERM)


def spawn(argv: list[str], *, what: str, deaf: bool = False, **popen: Any) -> subprocess.Popen:
    """``subprocess.Popen(argv)`` in a session of its own that, on Linux, the kernel signals
    when this process dies, however it dies (``PR_SET_PDEATHSIG``): SIGTERM, or SIGKILL for a
    ``deaf`` child, which starts with SIGINT and SIGTERM blocked (its owner stops it another
    way; see ``cli/prefect_server.py``).

    Raises :class:`LocalServerError` naming ``what`` and the reason when the kernel refuses:
    a child that could outlive the command is not started.
    """
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(argv, start_new_session=True, **popen)
    import ctypes

    prctl = _load_prctl()
    parent = os.getpid()
    read_end, write_end = os.pipe()
    death_signal = signal.SIGKILL if deaf else signal.SIGTERM

    def die_with_parent() -> None:  # runs in the child, between fork and exec
        if deaf:
            signal.pthread_sigmask(signal.SIG_BLOCK, DEAF_TO)
        if prctl(PR_SET_PDEATHSIG, death_signal) != 0:
            reason = os.strerror(ctypes.get_errno() or 0)
            os.write(write_end, f"PR_SET_PDEATHSIG failed: {reason}".encode())
            raise OSError(reason)
        if os.getppid() != parent:  # this process died before the request took effect
            os._exit(1)

    try:
        return subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent, **popen)
    except subprocess.SubprocessError:
        os.close(write_end)
        write_end = -1
        reason = os.read(read_end, 500).decode(errors="replace") or "its set-up failed"
        raise LocalServerError(
            f"did not start {what}: the kernel could not be asked to stop it with this "
            f"command ({reason}), so it could be left running"
        ) from None
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def stop_process_group(
    process: subprocess.Popen, grace: float, hurry: Callable[[], bool] = lambda: False
) -> None:
    """SIGTERM the leader of ``process``'s group, wait up to ``grace`` seconds (less once
    ``hurry()`` says so), then SIGKILL whatever is left in the group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline and not hurry():
            time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


# --- the server ---------------------------------------------------------------------------------


class LocalPrefectServer:
    """One uvicorn process serving Prefect's API on a loopback port.

    ``temporary``: what Prefect's own temporary server runs (no UI, no scheduler, its log
    rewritten each time); otherwise a full server with its scheduler and UI, appending to its
    log. ``home``: its ``PREFECT_HOME`` (SQLite database); default the current one.
    """

    def __init__(
        self,
        *,
        temporary: bool = True,
        home: Path | None = None,
        port: int | None = None,
        startup_timeout: float | None = None,
    ) -> None:
        self.temporary = temporary
        self.home = Path(home) if home is not None else prefect_home()
        self.port = port or free_port()
        self.api_url = f"http://{HOST}:{self.port}/api"
        self.log_path = self.home / LOG_NAME
        self.startup_timeout = startup_timeout
        self.name = "Prefect's temporary server" if temporary else "the local Prefect server"
        self.process: subprocess.Popen | None = None
        self._ready = False
        self._stopped = False

    def start(self) -> LocalPrefectServer:
        env = {**os.environ, **(_TEMPORARY_ENV if self.temporary else _FULL_ENV)}
        env["PREFECT_HOME"] = str(self.home)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        env.setdefault("DO_NOT_TRACK", "1")
        env.pop("PREFECT_API_URL", None)
        argv = [sys.executable, "-m", "cli.prefect_server", "--host", HOST]
        argv += ["--port", str(self.port), "--log-level", "error" if self.temporary else "warning"]
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("wb" if self.temporary else "ab") as log:
                self.process = spawn(
                    argv,
                    what=self.name,
                    deaf=True,
                    env=env,
                    stdin=subprocess.PIPE,  # its end of file stops the server
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        except OSError as exc:
            raise LocalServerError(f"could not start {self.name}: {exc}") from None
        atexit.register(self.stop)
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``/api/health`` answers 200; raise LocalServerError with the log tail."""
        if self._ready:
            return
        if self.process is None:
            raise LocalServerError(f"{self.name} was never started")
        if timeout is None:
            timeout = self.startup_timeout or float(
                os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180)
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise LocalServerError(
                    f"{self.name} exited with code {code} before it was ready; "
                    f"its log ({self.log_path}) ends with: {log_tail(self.log_path)}"
                )
            if is_healthy(self.api_url):
                self._ready = True
                return
            time.sleep(0.05)
        self.stop()
        raise LocalServerError(
            f"{self.name} did not answer {self.api_url}/health within {timeout:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); "
            f"its log ({self.log_path}) ends with: {log_tail(self.log_path)}"
        )

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def release(self) -> None:
        """Ask the server to stop (close its stdin) without waiting: for when this process is
        done with it; it shuts down while this process exits, and ``stop`` (at exit) waits for
        what is left of that."""
        if self.process is not None and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()

    def stop(self, grace: float = 10.0, hurry: Callable[[], bool] = lambda: False) -> None:
        """Stop the server (idempotent); Prefect's clients must be done with it.

        Closes the server's stdin (it then shuts down gracefully), waits up to ``grace``
        seconds (less once ``hurry()`` says so), then SIGKILLs what is left of its process
        group. A server that never became ready is killed at once: it holds nothing yet.
        """
        if self.process is not None and not self._stopped:
            self._stopped = True
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
            if not self._ready:
                grace = 0.0
            deadline = time.monotonic() + grace
            while self.process.poll() is None and time.monotonic() < deadline and not hurry():
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]


# --- the temporary server of screen and nightly -------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any] | None:
    """A TOML file's content, None when there is no such file; a broken one is an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalServerError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LocalServerError(
            f"{path} is not valid TOML ({exc}); Prefect cannot read it either: fix it, or set "
            "PREFECT_API_URL"
        ) from None


def _table(path: Path, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LocalServerError(f"{path}: {where} is not a table")
    return value


def configured_api_url() -> str | None:
    """An API URL Prefect would use instead of a temporary server, read without importing it.

    Looks where users set it: the environment, the active profile in
    ``$PREFECT_HOME/profiles.toml`` and ``[api] url`` in ``./prefect.toml``. (Importing
    Prefect to ask would freeze its settings before this module can point it at our server;
    when it is imported already, it is asked.)
    A file that is there but unreadable raises :class:`LocalServerError`: it may name the
    server the user meant.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    loaded = sys.modules.get("prefect.settings")
    if loaded is not None:  # already imported (a test harness, a calling program): ask it
        return loaded.PREFECT_API_URL.value() or None
    path = prefect_home() / "profiles.toml"
    profiles = _read_toml(path)
    if profiles is not None:
        active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
        table = _table(path, profiles.get("profiles", {}), "[profiles]")
        profile = _table(path, table.get(active, {}), f"the profile [profiles.{active}]")
        if profile.get("PREFECT_API_URL"):
            return str(profile["PREFECT_API_URL"])
    path = Path("prefect.toml")
    project = _read_toml(path)
    if project is not None:
        url = _table(path, project.get("api", {}), "[api]").get("url")
        if url:
            return str(url)
    return None


def start_local_server() -> LocalPrefectServer | None:
    """Start the temporary server unless Prefect is configured to use another API.

    Call first thing in a command, before importing Prefect or torch, then ``wait_ready()``
    before the first flow call. Sets ``PREFECT_API_URL`` for this process so Prefect's client
    uses this server and does not start its own. Returns None when an API URL is configured
    (see :func:`configured_api_url`) or temporary servers are disabled.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    for name in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        if os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off"):
            return None
    if configured_api_url():
        return None
    global _temporary
    server = _temporary = LocalPrefectServer(temporary=True).start()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


_temporary: LocalPrefectServer | None = None  # the one this command started


def done_with_temporary_server(flush_timeout: float = 10.0) -> None:
    """The command has made its last call to its temporary server (if it started one): send
    Prefect's buffered logs and events now, then let the server shut down while the command
    exits, instead of after (its graceful stop takes a second or more)."""
    if _temporary is None or _temporary.process is None or _temporary.exited():
        return
    for module, name in (
        ("prefect.events.worker", "EventsWorker"),
        ("prefect.logging.handlers", "APILogWorker"),
    ):
        worker = getattr(sys.modules.get(module), name, None)
        if worker is not None:
            # Prefect's services drain themselves at exit too; here only earlier. A Prefect
            # whose services changed shape just drains at exit, with the server still up.
            with contextlib.suppress(Exception):
                worker.drain_all(timeout=flush_timeout)
    _temporary.release()


@contextlib.contextmanager
def prefect_ready() -> Iterator[LocalPrefectServer | None]:
    """A Prefect API for flows run in this process, ready when the block ends.

    Starts the temporary server (unless one is configured), quiets Prefect's console logging,
    and lets the block import the flow while the server boots in its own process; at the end
    of the block, imports what the run needs first and waits for the server. Raises
    :class:`LocalServerError` when the server cannot start.
    """
    from cli.console import quiet_console

    server = start_local_server()
    quiet_console()
    yield server
    _import_ahead()
    if server is not None:
        server.wait_ready()


def _import_ahead() -> None:
    """Import now what a run would import on its critical path, while the server boots.

    Creating a flow run makes Prefect import FastAPI to serialise the parameters (~0.6 s here)
    and opening the run imports Alembic (~0.35 s); the server takes longer to boot than the
    command takes to import torch and the flow, so done here the wait absorbs them.
    """
    import importlib

    for name in ("fastapi.encoders", "sql.db"):
        # a later Prefect may not need FastAPI; the run imports what it needs anyway
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
