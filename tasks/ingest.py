"""From sources to per-file outcomes: discovery, header scan, selection, decoding.

Every discovered file ends in exactly one :class:`ScanItem` outcome here or, for selected files,
in :func:`decode_item` (which turns a decode failure into a *failed* outcome): nothing that
concerns one file raises out of these functions.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.spec import PreprocessSpec
from tasks.dicom import fingerprint, identity
from tasks.dicom.discovery import DEFAULT_LIMITS, ArchiveLimits, SourceFile, discover
from tasks.dicom.headers import InstanceHeader, parse_bytes, read_header
from tasks.dicom.outcomes import InputError, Outcome, SkipReason
from tasks.dicom.pixels import Parsed, preprocess, pydicom_warnings
from tasks.dicom.selection import DEFAULT_POLICY, SelectionPolicy, select
from tasks.dicom.sources import Source, guarded
from tasks.dicom.thumbnails import write_thumbnail

NO_HEADER_REASON = "no header was read from the file, so it cannot be decoded or stored"


@dataclass
class ScanItem:
    """One discovered file after the header scan and selection.

    ``outcome`` is None while the file is selected and awaits decoding and prediction.
    ``deferred``: not scanned yet; the decode worker scans it (``scan(..., in_workers=True)``).
    """

    source: SourceFile
    header: InstanceHeader | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    deferred: ScanRequest | None = None

    @property
    def uri(self) -> str:
        return self.source.uri

    @property
    def selected(self) -> bool:
        """Selected (or not scanned yet: ``deferred``)."""
        return self.outcome is None


def scan_file(src: SourceFile, policy: SelectionPolicy, hmac_key: bytes) -> ScanItem:
    """Header scan and selection for one file; never raises for a bad file."""
    if src.error is not None:
        return ScanItem(src, None, Outcome.FAILED, src.error)
    return _scanned(src, lambda: read_header(src, hmac_key), policy)


def scan_item(
    src: SourceFile, policy: SelectionPolicy, hmac_key: bytes, request: ScanRequest | None
) -> ScanItem:
    """``scan_file``, or with a ``request``, the file left to the worker that reads it (a
    listing error is recorded at once)."""
    if request is not None and src.error is None:
        return ScanItem(src, deferred=request)
    return scan_file(src, policy, hmac_key)


def _scanned(
    src: SourceFile, read: Callable[[], InstanceHeader], policy: SelectionPolicy
) -> ScanItem:
    """The scan's outcome for ``src`` given how to read its header (from the file, or from
    the bytes a worker read: ``scan_bytes``)."""
    try:
        with warnings.catch_warnings():
            # pydicom's value-validation warnings: the reason a file fails is recorded with it
            warnings.simplefilter("ignore")
            header = read()
    except SkipReason as exc:
        return ScanItem(src, None, Outcome.SKIPPED, str(exc))
    except InputError as exc:
        return ScanItem(src, None, Outcome.FAILED, str(exc))
    except Exception as exc:  # a parser bug must not stop the batch: record it with the file
        return ScanItem(
            src,
            None,
            Outcome.FAILED,
            f"unexpected error reading the header: {type(exc).__name__}: {exc}",
        )
    reason = select(header, policy)
    if reason is not None:
        return ScanItem(src, header, Outcome.SKIPPED, reason)
    return ScanItem(src, header)


def scan_bytes(
    src: SourceFile, data: bytes, policy: SelectionPolicy, hmac_key: bytes
) -> tuple[ScanItem, Parsed | None]:
    """``scan_file`` for a file whose bytes were read already (once, by the decode worker),
    parsed once: also the data set for the pixel path (None when the scan failed, or when the
    file could not be parsed whole: the pixel path then parses it and says why)."""
    parsed: list[Parsed] = []

    def read() -> InstanceHeader:
        header, ds, caught = parse_bytes(src.uri, data, hmac_key)
        if ds is not None:
            parsed.append(Parsed(ds, pydicom_warnings(caught)))
        return header

    item = _scanned(src, read, policy)
    return item, parsed[0] if parsed else None


@dataclass(frozen=True)
class ScanRequest:
    """The header scan and selection, left to the decode worker that reads the file (so that
    each file is read once: ``scan(..., in_workers=True)``)."""

    policy: SelectionPolicy
    hmac_key: bytes = field(repr=False)


@dataclass(frozen=True)
class WorkerScan:
    """A worker's scan of one file (``decode_item``'s ``scan``): the request, and what the
    planner knows of the file's URI before anyone has read it: ``predicted_uid``, the SOP
    Instance UID this model version already predicted from this very URI (a file that still
    has it is not decoded again), and ``stored``, the stored identity of the instances
    recorded at this URI by any model version, by UID (``sql.predictions.StoredIdentity``
    values as tuples: content hash, pixel fingerprint scheme)."""

    request: ScanRequest
    predicted_uid: str | None = None
    stored: dict[str, tuple[str, str]] = field(default_factory=dict)


def scan(
    sources: Iterable[str | Path | Source],
    hmac_key: bytes,
    policy: SelectionPolicy = DEFAULT_POLICY,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    newer_than: float | None = None,
    in_workers: bool = False,
) -> Iterator[ScanItem]:
    """Stream every discovered file through the header scan and selection.

    ``sources``: paths (folders, files, archives: ``discover``) and :class:`Source` objects
    (a PACS retrieval, ``tasks.dicom.pacs``), listed in that order: the paths first.
    ``newer_than`` (a POSIX time) keeps only local files that arrived later: their change or
    modification time on disk (an archive's members share the archive's times); it does not
    apply to a ``Source``'s entries (a PACS source chooses its studies by date itself).
    ``in_workers``: files are not read here; each comes with a :class:`ScanRequest`
    (``ScanItem.deferred``) and the decode worker that reads it scans it (each file is read and
    parsed once, and this process only lists files). An entry listed with an error (a file
    that cannot be listed, a PACS retrieval that failed) gets its outcome here at once.
    """
    request = ScanRequest(policy, hmac_key) if in_workers else None
    listed = list(sources)
    paths = [s for s in listed if isinstance(s, str | os.PathLike)]
    others = [s for s in listed if not isinstance(s, str | os.PathLike)]
    for src in discover(paths, limits) if paths else ():
        if newer_than is not None and src.error is None and _arrived(src) <= newer_than:
            continue
        yield scan_item(src, policy, hmac_key, request)
    for source in others:
        for entry in guarded(source):
            yield scan_item(entry, policy, hmac_key, request)  # type: ignore[arg-type]


def _arrived(src: SourceFile) -> float:
    # ctime changes when a file is created, moved or copied in, even with preserved mtimes
    try:
        st = os.stat(src.path)
    except OSError:
        return float("inf")  # let the scan report the problem
    return max(st.st_mtime, st.st_ctime)


def shards(items: Iterable[ScanItem], size: int) -> Iterator[list[ScanItem]]:
    """Consecutive shards of ``size`` files (any outcome); memory is bounded by ``size``."""
    if size < 1:
        raise ValueError(f"shard size should be at least 1 instead of {size}")
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


THUMBNAIL_SIZE = 256  # px, the longer side of a stored thumbnail


@dataclass
class Decoded:
    """The result of decoding one selected file (in a worker process).

    ``content_sha256`` hashes the file's content (``fingerprint.content_sha256``: its bytes, with
    native pixel data entering as its pixel fingerprint); the content fingerprints identify the
    image whatever its encoding (``tasks.dicom.fingerprint``): ``pixel_fingerprint`` (``px2``) when
    the full-resolution values were decoded, ``codestream_fingerprint`` (``cs1``) when the pixel
    path decoded at reduced resolution, and both when ``decode_item`` was asked for them.
    """

    uri: str
    image: np.ndarray | None = None  # float32 (C, H, W) when decoded
    content_sha256: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    thumbnail_path: str | None = None
    error: str | None = None
    pixel_fingerprint: str | None = None
    codestream_fingerprint: str | None = None
    # A worker's scan (``decode_item(scan=...)``): the header it read, the scan's outcome when
    # the file was not decoded because of it (skipped or failed, with the reason), and
    # ``already_done``: the file still has the UID this model version predicted from it
    header: InstanceHeader | None = None
    scan_outcome: Outcome | None = None
    scan_reason: str | None = None
    already_done: bool = False

    def fingerprints(self) -> dict[str, str]:
        """The fingerprints known, as ``sql.rows.INSTANCE_KEYS`` names them."""
        known = {
            "pixel_fingerprint": self.pixel_fingerprint,
            "codestream_fingerprint": self.codestream_fingerprint,
        }
        return {k: v for k, v in known.items() if v}


def thumbnail_path_for(thumbnails_dir: str | Path, sop_instance_uid: str) -> Path:
    """Where an instance's thumbnail lives: fanned out by a hash so folders stay small."""
    digest = hashlib.sha256(sop_instance_uid.encode()).hexdigest()
    return Path(thumbnails_dir) / digest[:2] / f"{digest[2:18]}.jpg"


def decode_item(
    src: SourceFile,
    sop_instance_uid: str | None,
    spec_dict: dict[str, Any],
    reduced: bool = True,
    thumbnails_dir: str | None = None,
    thumbnail_size: int = THUMBNAIL_SIZE,
    both_fingerprints: bool = False,
    pixel_kind: str = fingerprint.PIXELS,
    stored_content_sha256: str | None = None,
    scan: WorkerScan | None = None,
) -> Decoded:
    """Read, preprocess and hash one selected file; a failure is returned, never raised.

    ``both_fingerprints``: also compute the content fingerprint of the other kind (a full
    decode for a file the pixel path decoded at reduced resolution; the codestream's hash for
    an encapsulated file it decoded fully), for a file whose SOP Instance UID was seen before
    (the planner asks): the stored copy can then be compared whichever kind it has.
    ``pixel_kind``: the kind of pixel fingerprint (``px2``; ``px1`` when the planner found the
    UID stored with one, as versions before 2026-11-29 stored it). ``stored_content_sha256``:
    the content hash stored for this UID; a file that has it is the stored content (the same
    file screened again, by another model version say), and the other fingerprint is not
    computed (for a JPEG 2000 file decoded at reduced resolution that would be a full decode).
    ``scan``: the file was not scanned yet (``sop_instance_uid`` is None): read it, scan it
    from the bytes read (``scan_bytes``), and decode it only when it is selected and not
    already predicted from this URI (``WorkerScan``); the fingerprint arguments then come from
    what the planner knows of the UID read (another file's copy is checked after:
    ``tasks.screening.ShardProcessor.collect``).
    Module-level and picklable so that a spawn-context process pool can run it.
    """
    spec = PreprocessSpec.from_dict(spec_dict)
    try:
        data = src.read_bytes()
    except InputError as exc:
        return Decoded(src.uri, error=str(exc))
    except Exception as exc:  # a reader bug must not stop the batch
        return Decoded(src.uri, error=f"unexpected error reading the file: {_exc(exc)}")
    header = None
    source: bytes | Parsed = data
    if scan is not None:
        found = worker_scan(src, data, scan)
        if isinstance(found, Decoded):
            return found
        header, source = found.header, found.parsed or data
        both_fingerprints, pixel_kind, stored_content_sha256 = found.rule
        sop_instance_uid = header.sop_instance_uid
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pre = preprocess(
                source,
                spec,
                reduced=reduced,
                thumbnail_size=thumbnail_size if thumbnails_dir else None,
                pixel_kind=pixel_kind,
            )
    except InputError as exc:
        return Decoded(src.uri, error=str(exc), header=header)
    except MemoryError:
        return Decoded(src.uri, error="out of memory while decoding the image", header=header)
    except Exception as exc:  # a decoder bug must not stop the batch
        return Decoded(
            src.uri, error=f"unexpected error while decoding: {_exc(exc)}", header=header
        )
    thumb = None
    if thumbnails_dir and pre.thumbnail is not None and sop_instance_uid:
        path = thumbnail_path_for(thumbnails_dir, sop_instance_uid)
        try:
            write_thumbnail(pre.thumbnail, path, size=thumbnail_size)
            thumb = str(path)
        except OSError as exc:
            pre.facts["thumbnail_error"] = f"could not write the thumbnail: {exc.strerror or exc}"
    decoded = Decoded(src.uri, pre.image, None, pre.facts, thumb, header=header)
    identify(
        decoded,
        data,
        pre.fingerprint,
        pre.pixel_span,
        both_fingerprints=both_fingerprints,
        pixel_kind=pixel_kind,
        stored_content_sha256=stored_content_sha256,
    )
    return decoded


@dataclass
class Scanned:
    """A selected file scanned by its worker: its header, the fingerprint arguments for its
    UID from what the planner knows (both fingerprints, pixel kind, stored content hash), and
    the data set parsed for the header scan, which the pixel path uses as it is."""

    header: InstanceHeader
    rule: Rule
    parsed: Parsed | None  # None: not parsed whole (``scan_bytes``)


@functools.cache
def _decode_item_signature() -> inspect.Signature:
    return inspect.signature(decode_item)


def call_arguments(call: tuple) -> dict[str, Any]:
    """``decode_item``'s arguments by name (defaults filled in) from its positional tuple."""
    bound = _decode_item_signature().bind(*call)
    bound.apply_defaults()
    return dict(bound.arguments)


def worker_scan(src: SourceFile, data: bytes, scan: WorkerScan) -> Decoded | Scanned:
    """A decode worker's scan of the file it read (``decode_item``'s ``scan``, and the device
    path's workers): a result that ends the file here (skipped or failed by the scan, or
    already predicted from this URI), or what it needs to decode the file (:class:`Scanned`)."""
    item, parsed = scan_bytes(src, data, scan.request.policy, scan.request.hmac_key)
    if item.outcome is not None:
        return Decoded(
            src.uri, header=item.header, scan_outcome=item.outcome, scan_reason=item.reason
        )
    header = item.header
    assert header is not None  # a selected file has its header
    if header.sop_instance_uid == scan.predicted_uid:
        return Decoded(src.uri, header=header, already_done=True)
    return Scanned(header, fingerprint_rule(scan.stored.get(header.sop_instance_uid)), parsed)


Rule = tuple[bool, str, str | None]
"""``decode_item``'s fingerprint arguments: both fingerprints, pixel kind, stored content hash."""


def fingerprint_rule(stored: tuple[str, str] | None, unsettled: bool = False) -> Rule:
    """``decode_item``'s fingerprint arguments for a file, from what is known of its UID:
    ``stored`` (content hash, pixel fingerprint scheme: ``sql.predictions.StoredIdentity``) when
    an instance with it is stored, ``unsettled`` when another file with it may not be stored
    yet (in the same shard, or in one whose write is in flight). Both fingerprints when another
    copy may exist (unless the file has the stored content hash: ``identify``), in the stored
    pixel kind (``px1`` for instances stored before 2026-11-29), else today's."""
    kind = fingerprint.PIXELS
    if stored is not None and stored[1] in fingerprint.PIXEL_KINDS:
        kind = stored[1]
    if unsettled:
        return True, kind, None
    if stored is None:
        return False, kind, None
    return True, kind, stored[0]


def _exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def identify(
    decoded: Decoded,
    data: bytes,
    known: str,
    span: tuple[int, int] | None,
    *,
    both_fingerprints: bool,
    pixel_kind: str,
    stored_content_sha256: str | None,
) -> None:
    """Fill in a decoded file's content hash and fingerprints (``decode_item`` and the device
    path's workers alike): ``known`` is the fingerprint the pixel path computed and ``span``
    where the native pixel data it hashed lies in ``data`` (``fingerprint.content_sha256``);
    the other kind as :func:`decode_item` describes."""
    decoded.content_sha256 = fingerprint.content_sha256(data, known, span)
    other = both_fingerprints and decoded.content_sha256 != stored_content_sha256
    _set_fingerprints(decoded, known, data if other else None, pixel_kind)


def _set_fingerprints(decoded: Decoded, known: str, data: bytes | None, pixel_kind: str) -> None:
    """The pixel path's fingerprint in its field; with ``data``, the other kind too (a failure
    to compute it is a fact, not a failure of the file: the first kind is still known)."""
    if fingerprint.is_pixel(known):
        decoded.pixel_fingerprint = known
    elif known.startswith(f"{fingerprint.CODESTREAM}:"):
        decoded.codestream_fingerprint = known
    if data is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if decoded.pixel_fingerprint is None:
                decoded.pixel_fingerprint = identity.pixel_fingerprint(data, pixel_kind)
            elif decoded.codestream_fingerprint is None:
                decoded.codestream_fingerprint = identity.codestream_fingerprint(data)
    except InputError as exc:
        decoded.facts["fingerprint_error"] = f"the other content fingerprint failed: {exc}"
    except MemoryError:
        decoded.facts["fingerprint_error"] = "out of memory computing the full fingerprint"


def estimate_total(sources: Iterable[str | Path]) -> int | None:
    """A cheap count of the files ``discover`` will yield, for progress; None when unknown.

    Counts directory entries and zip members without reading them; a compressed tar stream
    cannot be counted without decompressing it, so its presence makes the total unknown.
    """
    import tarfile
    import zipfile

    total = 0

    def count_file(path: str) -> int | None:
        name = os.path.basename(path)
        if name.startswith(".") or name.upper() == "DICOMDIR":
            return 0
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return 1  # a FIFO or device: opening it could block; discovery reports it
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as zf:
                    return sum(1 for i in zf.infolist() if not i.is_dir())
            if tarfile.is_tarfile(path):
                return None
        except (OSError, zipfile.BadZipFile, tarfile.TarError):
            return 1
        return 1

    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            for root, dirs, files in os.walk(source):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for f in files:
                    n = count_file(os.path.join(root, f))
                    if n is None:
                        return None
                    total += n
        else:
            n = count_file(source)
            if n is None:
                return None
            total += n
    return total


def decode_many(args: list[tuple]) -> list[Decoded]:
    """``decode_item`` over a chunk of files: one pool task per chunk, not per image."""
    return [decode_item(*a) for a in args]


def init_worker() -> None:
    """Process-pool initializer of the decode workers: quiet stderr, exit with the parent."""
    quiet_worker()
    exit_with_parent()
    keep_freed_memory()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_below: int = 32 << 20, trim_above: int = 128 << 20) -> bool:
    """Let glibc reuse freed buffers of up to ``mmap_below`` bytes instead of unmapping them.

    Each image allocates several buffers of its own size (the file's bytes, the pixel data,
    the windowed image; 7.4 MB each at 2000 x 1840) and numpy's int64 index for ``take``
    (30 MB). By default glibc serves these with fresh ``mmap`` calls and returns them on
    ``free``, so every image pays a page fault and a zeroing for each 4 KB page it touches.
    Keeping them in the heap (and trimming it only above ``trim_above``) took one 2000 px
    image from 35-46 ms to 20-30 ms of one core (measured in a single process). A worker's
    resident memory stays bounded by the largest image it has decoded. Returns False where
    the C library is not glibc (nothing is changed).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_below)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_above)
    )


def exit_with_parent() -> None:
    """End this (spawned) worker as soon as the process that started it dies.

    A pool worker waits on its task queue, whose write end it holds itself, so it never sees
    end-of-file: when its parent is killed (SIGKILL, the OOM killer) the worker and the
    resource tracker would stay behind forever, holding memory. A daemon thread waits on the
    parent's sentinel (readable once the parent is gone) and exits the process.
    """
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def quiet_worker() -> None:
    """Process-pool initializer: codecs' C libraries print to stderr (e.g. OpenJPEG's "Tile part
    length size inconsistent with stream length" for a truncated file); the reason is recorded
    with the file instead, so the worker's stderr goes to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
