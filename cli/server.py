"""Prefect's temporary local server, started as a separate process before the heavy imports.

A flow called with no ``PREFECT_API_URL`` makes Prefect start a temporary server itself: it
imports the whole server package into the calling process (~5 s of CPU here, holding the GIL
while the command also imports torch) and then waits ~6 s for a uvicorn subprocess. Started
here instead, the server's process boots on the second core while this process imports torch
and Prefect's client, and this process never imports the server package at all: the fixed
start-up of ``cxr-screen screen`` drops from ~18 s to about the larger of the two.

The server is the same one Prefect would start (same app factory, same ``PREFECT_HOME``
database, UI off). It dies with the command: stopped at exit, and killed by the kernel if the
command itself is killed (``PR_SET_PDEATHSIG``), so a SIGKILLed run leaves no orphan server.
Its own output goes to a log file under ``PREFECT_HOME`` (shutdown tracebacks from Prefect's
background services never reach the terminal); a start-up failure quotes that file's tail.

This module imports only the standard library: it must run before Prefect and torch load.
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
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["LocalPrefectServer", "LocalServerError", "start_local_server"]

# Environment the server process gets on top of ours: what Prefect's own temporary server sets.
_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


class LocalServerError(RuntimeError):
    """The temporary Prefect server did not start."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel sends SIGTERM to the server when the command's process dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:
        pass


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


class LocalPrefectServer:
    """One uvicorn process serving Prefect's API on a free loopback port."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        home = _prefect_home()
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path or home / "cxr-screen-server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **_SERVER_ENV}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self._ready = False
        atexit.register(self.stop)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``/api/health`` answers 200; raise LocalServerError with the log tail."""
        if self._ready:
            return
        if timeout is None:
            timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise LocalServerError(
                    f"Prefect's temporary server exited with code {code} before it was ready; "
                    f"its log ({self.log_path}) ends with: {self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self._ready = True
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise LocalServerError(
            f"Prefect's temporary server did not answer within {timeout:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); "
            f"its log ({self.log_path}) ends with: {self._log_tail()}"
        )

    def _log_tail(self, chars: int = 600) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-chars:].replace("\n", " | ") or "(empty)"

    def stop(self) -> None:
        """Terminate the server (idempotent); Prefect's clients must be done with it."""
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self._log.closed:
            self._log.close()
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]


def _configured_api_url() -> str | None:
    """An API URL Prefect would use instead of a temporary server, read without importing it.

    Looks where users set it: the environment, the active profile in
    ``$PREFECT_HOME/profiles.toml`` and ``[api] url`` in ``./prefect.toml``. (Importing
    Prefect to ask would freeze its settings before this module can point it at our server.)
    """
    import tomllib

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    try:
        profiles = tomllib.loads((_prefect_home() / "profiles.toml").read_text())
        active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
        url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
        if url:
            return str(url)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        pass
    try:
        url = tomllib.loads(Path("prefect.toml").read_text()).get("api", {}).get("url")
        if url:
            return str(url)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        pass
    return None


def start_local_server() -> LocalPrefectServer | None:
    """Start the temporary server unless Prefect is configured to use another API.

    Call first thing in a command, before importing Prefect or torch, then ``wait_ready()``
    before the first flow call. Sets ``PREFECT_API_URL`` for this process so Prefect's client
    uses this server and does not start its own. Returns None when an API URL is configured
    (see ``_configured_api_url``) or temporary servers are disabled.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    for name in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        if os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off"):
            return None
    if _configured_api_url():
        return None
    server = LocalPrefectServer()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server
