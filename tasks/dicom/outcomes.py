"""The three outcomes every input file ends in, and the error that carries a file's reason."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    PREDICTED = "predicted"  # selected, decoded, preprocessed and scored
    SKIPPED = "skipped"  # excluded by the selection policy (or already done); reason says why
    FAILED = "failed"  # could not be read, decoded or trusted; reason names what was wrong


class InputError(Exception):
    """A file that cannot be used. ``str(error)`` is the reason stored with the file.

    The message names what was wrong: the tag, the value and the rule, e.g.
    "(0028,0101) 'Bits Stored' value 18 exceeds (0028,0100) 'Bits Allocated' 16".
    """


class SkipReason(Exception):
    """Raised (or returned) when the selection policy excludes a file; the text is the reason."""
