"""Ctrl-C and SIGTERM for the commands that run a screening run (``screen``, ``nightly``).

SIGINT or SIGTERM, to the command alone or to its whole process group (a terminal's Ctrl-C,
systemd, ``docker stop``), stops the run in order (``tasks/interrupts.py``): no new shard
starts, the shard being written commits or rolls back, the run is closed ``interrupted`` with
the counts of its committed shards. The command then says so on one line of stderr and exits
with 128 + the signal (130 for SIGINT, 143 for SIGTERM)::

    interrupted by SIGTERM: run 12 stopped after 3 shards (768 files); run the same command
    again to finish

A signal that comes while the run is stopping is ignored (the stop takes seconds; SIGKILL ends
it at once, and a later run marks the run ``abandoned``). Once the line is printed, or once
the command's work is done, another signal ends the process at once: what is left is Prefect
flushing its logs and the temporary server stopping. Both overlap the process's exit: the
server is told to stop once the command is done with it, and an interrupted command skips
the interpreter's teardown once the server has stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import click
import typer

from cli.console import err_console


class RunWatch:
    """Listens to the screening flows' progress events (``flows.progress``) for what the
    interrupted line says: which run, and how far it got."""

    def __init__(self) -> None:
        self.run_id: int | None = None
        self.completed = False
        self.stopped: dict[str, Any] | None = None

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "start":
            self.run_id, self.completed = data["run_id"], False
        elif event == "done":
            self.completed = True
        elif event == "interrupted":
            self.stopped = data

    def line(self, signum: int) -> str:
        """The one line an interrupted command prints."""
        name = _name(signum)
        if self.stopped is not None:
            s = self.stopped
            shards = f"{s['shards']} shard{'' if s['shards'] == 1 else 's'}"
            files = f"{s['files']} file{'' if s['files'] == 1 else 's'}"
            return (
                f"interrupted by {name}: run {s['run_id']} stopped after {shards} ({files}); "
                "run the same command again to finish"
            )
        if self.run_id is None:
            return f"interrupted by {name} before a run started: nothing was recorded"
        if self.completed:
            return f"interrupted by {name} after run {self.run_id} completed"
        return (
            f"interrupted by {name}: run {self.run_id} was stopped; run the same command again "
            "to finish"
        )


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _exit_now(signum: int, frame: FrameType | None) -> None:
    """After the run has ended: a further signal ends the process at once."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[RunWatch]:
    """For a command's body: SIGINT and SIGTERM stop its run in order, then the command
    prints one line and exits 130 or 143 (see the module's text)."""
    from cli.server import done_with_temporary_server
    from flows.progress import add_listener, remove_listener
    from tasks import interrupts

    watch = RunWatch()
    add_listener(watch)
    previous = interrupts.install()
    # Exit functions run last registered first: this one after the temporary server's stop.
    atexit.register(_end_an_interrupted_command)
    try:
        yield watch
    except BaseException as exc:
        signum = interrupts.signal_of(exc) or interrupts.stopping()
        if signum is None or isinstance(exc, typer.Exit | click.exceptions.Exit):
            raise
        interrupts.note(signum)
        err_console.print(watch.line(signum), highlight=False, soft_wrap=True)
        global _exit_code
        _exit_code = 128 + signum
        raise typer.Exit(_exit_code) from None
    finally:
        remove_listener(watch)
        interrupts.uninstall(previous)
        # This one before the exit functions of Prefect and of the temporary server.
        atexit.register(_late_signals_exit_now)
        done_with_temporary_server()


_exit_code: int | None = None  # set once an interrupted command has said so


def _end_an_interrupted_command() -> None:
    """The last exit function of an interrupted command, once its temporary server has
    stopped: end the process now, without the interpreter's own teardown (a second or more
    of freeing memory and unloading torch), which the stop has no use for."""
    if _exit_code is not None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(_exit_code)


def _late_signals_exit_now() -> None:
    with contextlib.suppress(ValueError):  # not the main thread
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _exit_now)
