"""SIGINT and SIGTERM stop a run between its steps, never in the middle of one.

A signal is an exception raised in the main thread wherever it happens to be (waiting for the
decode workers, scoring, waiting for a write to commit): a stop is quick. Writes run in a
thread of their own, so the shard being written commits or rolls back whatever the main thread
is doing; the run is then closed with the counts of the shards that committed.

- :func:`install` (the CLI, before a screening run): SIGINT and SIGTERM raise
  :class:`Interrupted` once; a signal that comes while the run is already stopping is
  ignored (the stop takes seconds; SIGKILL still ends it at once).
- :func:`in_charge` (a flow's body): Prefect's flow engine installs its own SIGTERM handler
  for the duration of a flow (it raises ``TerminationSignal`` and, after the flow, kills the
  process again with the signal); where :func:`install` armed this process, SIGTERM is handed
  back to :func:`handler` for the block, so that it raises once and the command, not the
  engine, ends the process with its one line. Elsewhere (a flow run started by a Prefect
  worker, which cancels by SIGTERM) Prefect's handler stays and its ``TerminationSignal`` is
  recognised as an interruption (:func:`signal_of`).
- :func:`held` (a few bookkeeping steps: counting a committed shard, handing a shard to the
  writer, opening and closing the run): a signal that comes during the block is delivered
  when it ends.

Signal handlers belong to the main thread: in any other thread these do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_stopping: int | None = None  # the signal that started the stop, once one did
_armed = False  # install() put handler() in place for this process


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM asked the process to stop (``signum``; exit status 128 + signum).

    A ``KeyboardInterrupt``: code that lets Ctrl-C through lets this through too, and Prefect
    records the flow run as stopped by an interrupt signal.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal_name(self.signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def signal_of(exc: BaseException | None) -> int | None:
    """The stop signal behind ``exc``, or None when ``exc`` is no interruption.

    :class:`Interrupted` carries its signal; a bare ``KeyboardInterrupt`` is SIGINT; Prefect's
    ``TerminationSignal`` (not imported here: ``tasks/`` stays plain) is a ``BaseException``
    with the signal in its ``signal`` attribute. An error raised while an interruption was
    being handled counts as that interruption (it is in the error's ``__context__`` chain):
    e.g. Prefect's ``ValueError: Task run is not set`` when the signal lands while a task
    starts, before its run exists.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Interrupted):
            return exc.signum
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        if not isinstance(exc, Exception):
            signum = getattr(exc, "signal", None)
            if isinstance(signum, int) and signum in STOP_SIGNALS:
                return signum
        exc = exc.__cause__ or exc.__context__
    return None


def stopping() -> int | None:
    """The signal that started this process's stop, or None."""
    return _stopping


def note(signum: int) -> None:
    """Record that a stop started (with ``signum``): later signals are then repeats."""
    global _stopping
    if _stopping is None:
        _stopping = int(signum)


def reset() -> None:
    """Forget a stop (tests, or a process that runs several commands)."""
    global _stopping
    _stopping = None


def handler(signum: int, frame: FrameType | None) -> None:
    """Raise :class:`Interrupted` for the first stop signal; ignore the ones after it."""
    if _stopping is not None:
        return
    note(signum)
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in this process (main thread only);
    returns the handlers they replace. A SIGINT ignored by the shell that started us (a
    background job) is taken over too: whoever sends it means it."""
    global _armed
    if not _in_main_thread():
        return {}
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    _armed = True
    return previous


def uninstall(previous: dict[int, Any]) -> None:
    global _armed
    if _in_main_thread():
        for s, h in previous.items():
            signal.signal(s, h)
        _armed = False


@contextlib.contextmanager
def in_charge() -> Iterator[None]:
    """For a flow's body: where :func:`install` armed this process, SIGINT and SIGTERM raise
    :class:`Interrupted` during the block, whatever Prefect's engine installed."""
    if not (_armed and _in_main_thread()):
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM during the block and deliver the first that came at its end
    (to the handler in place before it); a signal that comes while a stop is already under
    way (:func:`note`) is dropped. Nested blocks deliver at the outermost end."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, record) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if received and _stopping is None:
            signal.raise_signal(received[0])
