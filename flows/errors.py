"""The base of every error whose message is meant for the person at the terminal.

``cli/`` prints a ``UserError`` as its message alone, on one line (``--debug`` adds the
traceback); anything else is a bug or an unexpected failure and is shown with its class name.
It lives here, with no imports, so that ``flows/`` (which raises these) and ``cli/`` (which
prints them) can both import it without a circle.
"""

from __future__ import annotations


class UserError(RuntimeError):
    """A fatal problem the user can act on: the message names the value and the rule."""
