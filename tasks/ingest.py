"""From sources to per-file outcomes: discovery, header scan, selection, decoding.

Every discovered file ends in exactly one :class:`ScanItem` outcome here or, for selected files,
in :func:`decode_item` (which turns a decode failure into a *failed* outcome): nothing that
concerns one file raises out of these functions.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.spec import PreprocessSpec
from tasks.dicom import fingerprint, identity
from tasks.dicom.discovery import DEFAULT_LIMITS, ArchiveLimits, SourceFile, discover
from tasks.dicom.headers import InstanceHeader, read_header
from tasks.dicom.outcomes import InputError, Outcome, SkipReason
from tasks.dicom.pixels import preprocess
from tasks.dicom.selection import DEFAULT_POLICY, SelectionPolicy, select
from tasks.dicom.sources import Source, guarded
from tasks.dicom.thumbnails import write_thumbnail

NO_HEADER_REASON = "no header was read from the file, so it cannot be decoded or stored"


@dataclass
class ScanItem:
    """One discovered file after the header scan and selection.

    ``outcome`` is None while the file is selected and awaits decoding and prediction.
    """

    source: SourceFile
    header: InstanceHeader | None = None
    outcome: Outcome | None = None
    reason: str | None = None

    @property
    def uri(self) -> str:
        return self.source.uri

    @property
    def selected(self) -> bool:
        return self.outcome is None


def scan_file(src: SourceFile, policy: SelectionPolicy, hmac_key: bytes) -> ScanItem:
    """Header scan and selection for one file; never raises for a bad file."""
    if src.error is not None:
        return ScanItem(src, None, Outcome.FAILED, src.error)
    try:
        with warnings.catch_warnings():
            # pydicom's value-validation warnings: the reason a file fails is recorded with it
            warnings.simplefilter("ignore")
            header = read_header(src, hmac_key)
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


def scan(
    sources: Iterable[str | Path | Source],
    hmac_key: bytes,
    policy: SelectionPolicy = DEFAULT_POLICY,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    newer_than: float | None = None,
) -> Iterator[ScanItem]:
    """Stream every discovered file through the header scan and selection.

    ``sources``: paths (folders, files, archives: ``discover``) and :class:`Source` objects
    (a PACS retrieval, ``tasks.dicom.pacs``), listed in that order: the paths first.
    ``newer_than`` (a POSIX time) keeps only local files that arrived later: their change or
    modification time on disk (an archive's members share the archive's times); it does not
    apply to a ``Source``'s entries (a PACS source chooses its studies by date itself).
    """
    listed = list(sources)
    paths = [s for s in listed if isinstance(s, str | os.PathLike)]
    others = [s for s in listed if not isinstance(s, str | os.PathLike)]
    for src in discover(paths, limits) if paths else ():
        if newer_than is not None and src.error is None and _arrived(src) <= newer_than:
            continue
        yield scan_file(src, policy, hmac_key)
    for source in others:
        for entry in guarded(source):
            yield scan_file(entry, policy, hmac_key)  # type: ignore[arg-type]


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
    sop_instance_uid: str,
    spec_dict: dict[str, Any],
    reduced: bool = True,
    thumbnails_dir: str | None = None,
    thumbnail_size: int = THUMBNAIL_SIZE,
    both_fingerprints: bool = False,
    pixel_kind: str = fingerprint.PIXELS,
    stored_content_sha256: str | None = None,
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
    Module-level and picklable so that a spawn-context process pool can run it.
    """
    spec = PreprocessSpec.from_dict(spec_dict)
    try:
        data = src.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pre = preprocess(
                data,
                spec,
                reduced=reduced,
                thumbnail_size=thumbnail_size if thumbnails_dir else None,
                pixel_kind=pixel_kind,
            )
    except InputError as exc:
        return Decoded(src.uri, error=str(exc))
    except MemoryError:
        return Decoded(src.uri, error="out of memory while decoding the image")
    except Exception as exc:  # a decoder bug must not stop the batch
        return Decoded(
            src.uri, error=f"unexpected error while decoding: {type(exc).__name__}: {exc}"
        )
    thumb = None
    if thumbnails_dir and pre.thumbnail is not None:
        path = thumbnail_path_for(thumbnails_dir, sop_instance_uid)
        try:
            write_thumbnail(pre.thumbnail, path, size=thumbnail_size)
            thumb = str(path)
        except OSError as exc:
            pre.facts["thumbnail_error"] = f"could not write the thumbnail: {exc.strerror or exc}"
    decoded = Decoded(src.uri, pre.image, None, pre.facts, thumb)
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
