"""A process-local progress listener: the CLI draws a progress bar from the flow's events.

Flow parameters must be serialisable, so the listener is not one: the CLI registers it here
before calling the flow, and the flow reports through :func:`report`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []


def add_listener(fn: Listener) -> None:
    _listeners.append(fn)


def remove_listener(fn: Listener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def report(event: str, **data: Any) -> None:
    for fn in list(_listeners):
        fn(event, data)
