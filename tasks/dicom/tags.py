"""How every message names a DICOM attribute: ``(0028,0101) 'Bits Stored'``.

A reason stored with a file (and a fact such as ``inverted_by``) names an attribute by its tag,
four upper-case hex digits for the group and for the element, followed by its name from the
DICOM dictionary in single quotes. People find the attribute in any DICOM viewer by either half,
and tests and queries can search for it. Every module of ``tasks.dicom`` formats tags here; none
writes a tag by hand.

An attribute is given by keyword (``"BitsStored"``), by tag number (``0x00280101``) or by
``(group, element)``. A tag the dictionary does not know (private or retired-and-removed) is
named ``'private or unknown element'``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from pydicom.datadict import dictionary_description
from pydicom.tag import BaseTag, Tag

TagLike = str | int | tuple[int, int]

UNKNOWN_NAME = "private or unknown element"


def tag_of(tag: TagLike) -> BaseTag:
    """The tag; ``ValueError`` for a keyword the dictionary does not know (a programming error)."""
    return Tag(tag)


def tag_id(tag: TagLike) -> str:
    """``(GGGG,EEEE)``."""
    t = tag_of(tag)
    return f"({t.group:04X},{t.element:04X})"


def tag_name(tag: TagLike) -> str:
    """The attribute's dictionary name, or ``private or unknown element``."""
    try:
        return dictionary_description(tag_of(tag))
    except KeyError:
        return UNKNOWN_NAME


@functools.lru_cache(maxsize=512)
def label(tag: TagLike) -> str:
    """``(GGGG,EEEE) 'Name'``: how a message names an attribute."""
    return f"{tag_id(tag)} '{tag_name(tag)}'"


def labels(tags: Iterable[TagLike], joiner: str = ", ") -> str:
    """Several labels joined, e.g. ``(0008,0018) 'SOP Instance UID', (0020,000D) '...'``."""
    return joiner.join(label(t) for t in tags)
