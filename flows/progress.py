"""Progress events: the flows report what they do, whoever listens in this process draws it.

Flow parameters must be serialisable, so a listener is not one: the caller (the CLI's
``cli.console.PipelineProgress``) registers it here before calling the flow, and the flow
reports through :func:`report`. Without a listener, reporting costs nothing.

Events and their data:

- ``start`` (run_id, total, ...), ``shard`` (seen, files, counts), ``done`` (the summary):
  a screening run, from ``flows.screen`` and ``flows.fanout``;
- ``train-start``, ``train-data`` (stage, done, total), ``train-dataset``, ``train-epoch``
  (epoch, epochs, train_loss, val_auroc, ...), ``train-done``: a training run;
- ``demo-stage`` (key, label, total / completed / done): the demo's own steps.
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
