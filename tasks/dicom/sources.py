"""Where input files come from: the seam between a source and the rest of the pipeline.

A :class:`Source` lists :class:`InputFile`\\ s; the header scan (``tasks.dicom.headers``), the
selection, the decode workers (``tasks.dicom.pixels``) and the outcome records see nothing
else. Folders, single files and archives are one source (``tasks.dicom.discovery``:
:class:`~tasks.dicom.discovery.LocalFiles`, whose entries are
:class:`~tasks.dicom.discovery.SourceFile`\\ s); a DICOMweb (QIDO-RS + WADO-RS) or DIMSE
(C-FIND + C-MOVE/C-GET) source in ``tasks.dicom.pacs`` is another, written against this module.

Contract of a source, ``files()``:

* **Streamed.** A generator that yields each file as soon as it is known: memory must not grow
  with the number of files (page through QIDO-RS results; never collect a whole listing).
  The order is stable for the same content, so a re-run meets files in the same order.
* **Never raises for one bad file.** A file that cannot be listed, named or fetched is yielded
  as an *errored entry* (``error`` set to the reason, written for the person reading the run
  summary: what was wrong, with the value and the rule, no stack trace). It ends as a *failed*
  outcome with that reason and the batch goes on.
* **A failed listing is one errored entry.** When the listing itself breaks part-way (server
  unreachable, a truncated archive, a query the server refuses), the source yields the files
  found so far, then one errored entry whose ``uri`` names the source, and stops. Only
  programming errors may raise; :func:`guarded` turns even those into that errored entry.
* **One URI per entry.** Within one listing every entry has its own ``uri``, the key its
  outcome is stored under and what people see; the same instance gets the same ``uri`` on the
  next run. A ``uri`` never carries a credential (no ``user:password@``, no token query).

Contract of an input file:

* ``uri``, ``error`` (None for a usable file) and ``size`` (bytes, None when unknown);
* ``open()``: a seekable binary stream of the file's bytes (the caller closes it), and
  ``read_bytes()``: all of them. Both raise ``InputError`` with the reason (an errored entry
  raises its ``error``); a source's own errors (HTTP status, DIMSE status, timeouts) become
  that ``InputError``'s text;
* **picklable and re-openable in another process**: decode workers run in a spawn-context
  pool, so an entry carries what is needed to fetch it again (e.g. its WADO-RS URL), never an
  open connection, and never a password (a worker reads credentials from its own settings);
* **cheap to list**: listing does not download pixel data; bytes are fetched by ``open`` /
  ``read_bytes``, in the worker that decodes the file. (An entry may carry its bytes when
  fetching them again is impossible, as compressed-tar members do.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

from tasks.dicom.outcomes import InputError


@runtime_checkable
class InputFile(Protocol):
    """One input instance (see the module text for the contract)."""

    @property
    def uri(self) -> str: ...

    @property
    def error(self) -> str | None: ...

    @property
    def size(self) -> int | None: ...

    def open(self) -> BinaryIO: ...

    def read_bytes(self) -> bytes: ...


@runtime_checkable
class Source(Protocol):
    """Lists input files (see the module text for the contract)."""

    @property
    def uri(self) -> str:
        """Names the source: the ``uri`` of the errored entry when its listing fails."""
        ...

    def files(self) -> Iterator[InputFile]: ...


@dataclass(frozen=True, slots=True)
class ErroredFile:
    """An entry that cannot be used: it becomes a failed outcome with ``error`` as the reason."""

    uri: str
    error: str
    size: int | None = None

    def open(self) -> BinaryIO:
        raise InputError(self.error)

    def read_bytes(self) -> bytes:
        raise InputError(self.error)


def guarded(source: Source) -> Iterator[InputFile]:
    """``source.files()``, with an exception out of the listing turned into one errored entry
    (the contract's "a failed listing is one errored entry", for sources that break it)."""
    try:
        yield from source.files()
    except Exception as exc:  # recorded as the source's errored entry; the batch goes on
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        yield ErroredFile(
            source.uri, f"listing the source failed part-way: {type(exc).__name__}: {text}"
        )
