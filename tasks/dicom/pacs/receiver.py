"""A C-STORE receiver: the PACS (or a modality) pushes radiographs, they land in the drop folder.

``Receiver`` is a pynetdicom storage SCP. Each instance it accepts is written in the DICOM file
format, exactly as it was sent (same transfer syntax, no transcoding), into the drop folder
that the ``nightly`` flow reads, and acknowledged only after that:

1. written to a hidden temporary file in the instance's final folder (discovery ignores names
   starting with ``.``), flushed and ``fsync``-ed;
2. renamed to its final name (``os.replace``, atomic within a folder), and the folder fsync-ed;
3. only then answered with status Success (0x0000).

Killing the receiver at any point therefore loses no acknowledged instance, and never leaves a
partial file under a final name (a leftover temporary file is removed at the next start). A
sender that got no answer sends the instance again; the same SOP Instance UID gets the same
file name and the rename replaces the earlier copy.
The rename also sets the file's change time (ctime) on Linux file systems, which is what the
nightly run's watermark compares: a file completed after a nightly scan started is picked up
by the next one, never skipped.

File names are the SHA-256 of the SOP Instance UID (``<drop>/<2 hex>/<64 hex>.dcm``, 256
sub-folders so no folder grows without bound): never patient data, the same instance always
lands on the same name.

What is accepted (and why):
- Storage SOP classes of projection radiographs: CR Image Storage, Digital X-Ray Image Storage
  for presentation and for processing (the selection policy skips "for processing" images with
  a reason, but a sender configured to push both gets a clean answer and the skip is recorded).
  Secondary Capture is **refused**: it is a derived picture (a screenshot, a scanned film, a
  dose sheet), not a radiograph the model was trained on. ``accepted_sop_classes`` changes it.
- Every other storage SOP class is accepted at the association level (so a PACS pushing a
  whole study, presentation states and reports included, is not turned away wholesale) and
  each such instance is answered with the DIMSE status 0x0122 "Refused: SOP Class not
  supported", which the sender logs per instance.
- Transfer syntaxes: implicit and explicit VR little endian, deflated, explicit big endian
  (retired, still sent by old devices), baseline and extended JPEG, lossless JPEG (process 14
  and its selection value 1), JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy,
  HTJ2K, RLE. The pixel path decodes all of them. When a sender offers several for one
  context, lossless compressed ones are preferred, then native, lossy last (see
  ``TRANSFER_SYNTAXES``): instances are stored as sent and never lossily re-encoded for us.
- Verification (C-ECHO), for set-up.

Other DIMSE answers: 0xA900 when the data set's SOP Class/Instance UID contradicts the
command, 0xC210 when the data set cannot be decoded, 0xA700 (out of resources) when it cannot
be written (disk full, permissions): the sender keeps it and retries.

Bounded: at most ``max_associations`` associations at once (the next one is rejected as
"local limit exceeded", which senders treat as transient). Logs carry counts, never patient
data or UIDs (pynetdicom's own per-message lines are kept at WARNING by the CLI).

Completeness for pushes: a push announces no count, so ``StudyTracker`` keeps, per study, when
its last instance arrived; a study is *receiving* until ``study_idle_seconds`` pass without a
new instance, then *settled*. The receiver writes the studies still receiving to
``<drop>/.cxr-screen-receiver/state.json`` (hidden from discovery) whenever that changes;
:func:`studies_receiving` reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

logger = logging.getLogger(__name__)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
RADIOGRAPH_STORAGE: tuple[UID, ...] = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)
VERIFICATION = UID("1.2.840.10008.1.1")

# pynetdicom, as the acceptor, takes the first syntax of this list that the sender proposed
# for a context. Lossless compressed first (the sender keeps its stored encoding, less on the
# wire), then native, lossy last: a sender holding native or lossless data that also offers a
# lossy syntax must never be asked to compress lossily; a lossy original offered with native
# alternatives arrives decoded (no further loss). A lossy-only proposal is accepted as sent.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000,
    HTJ2K,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

# DIMSE statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
REFUSED_OUT_OF_RESOURCES = 0xA700
ERROR_DATASET_DOES_NOT_MATCH = 0xA900
ERROR_CANNOT_UNDERSTAND = 0xC210

STATE_DIR = ".cxr-screen-receiver"
STATE_FILE = "state.json"
TEMP_SUFFIX = ".part"
STALE_TEMP_SECONDS = 60.0  # a temporary file older than this belongs to a dead receiver
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash


class ReceiverError(RuntimeError):
    """A setting or a condition that stops the receiver from starting."""


@dataclass(frozen=True)
class ReceiverConfig:
    """How the receiver listens and where it writes.

    ``allowed_calling_aes``: when not empty, only these AE titles may associate (others are
    rejected as "calling AE title not recognised"). ``study_idle_seconds``: how long a study
    stays *receiving* after its last instance (pushes carry no count).
    """

    drop_folder: Path
    ae_title: str = "CXRSCREEN"
    port: int = 11112
    host: str = "0.0.0.0"
    max_associations: int = 8
    study_idle_seconds: float = 30.0
    allowed_calling_aes: tuple[str, ...] = ()
    accepted_sop_classes: tuple[str, ...] = RADIOGRAPH_STORAGE
    network_timeout: float = 60.0
    dimse_timeout: float = 60.0
    acse_timeout: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop_folder", Path(self.drop_folder))
        for name, title in [("AE title", self.ae_title)] + [
            ("allowed calling AE title", t) for t in self.allowed_calling_aes
        ]:
            if not _AE_TITLE.match(title) or not title.strip():
                raise ReceiverError(
                    f"an {name} of {title!r} is invalid, it must be 1 to 16 printable ASCII "
                    "characters, not all spaces, without a backslash"
                )
        if not 0 <= self.port < 65536:
            raise ReceiverError(f"a port of {self.port} is invalid, it must be 0 to 65535")
        if self.max_associations < 1:
            raise ReceiverError(
                f"a maximum of {self.max_associations} associations is invalid, it must be 1 "
                "or more"
            )
        if not self.study_idle_seconds > 0:
            raise ReceiverError(
                f"a study idle time of {self.study_idle_seconds:g} s is invalid, it must be above 0"
            )
        if not self.accepted_sop_classes:
            raise ReceiverError("accepted_sop_classes is empty: the receiver would refuse all")


def instance_file_name(sop_instance_uid: str) -> str:
    """``<2 hex>/<64 hex>.dcm``: the SHA-256 of the SOP Instance UID, never patient data."""
    digest = hashlib.sha256(sop_instance_uid.strip().encode("ascii", "replace")).hexdigest()
    return f"{digest[:2]}/{digest}.dcm"


def write_atomically(folder: Path, relative: str, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to ``folder/relative`` so that the final name only ever shows a complete,
    durable file: hidden temporary name in the same folder, fsync, rename, fsync the folder.

    The temporary file is removed when anything fails before the rename.
    """
    final = folder / relative
    parent = final.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(parent.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem[:16]}.", suffix=TEMP_SUFFIX, dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(drop_folder: Path, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Delete temporary files a killed receiver left behind (never acknowledged); return how
    many. Only names this module creates (``.<hex>.<random>.part`` in a 2-hex folder)."""
    removed = 0
    cutoff = time.time() - older_than
    for sub in drop_folder.glob("[0-9a-f][0-9a-f]"):
        if not sub.is_dir():
            continue
        for tmp in sub.glob(f".*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
    return removed


# -- per-study completeness --------------------------------------------------------------------


@dataclass
class StudyProgress:
    instances: int
    first_seen: float  # wall-clock (time.time())
    last_seen: float


class StudyTracker:
    """Which studies are still receiving: no instance for ``idle_seconds`` means settled."""

    def __init__(self, idle_seconds: float, clock=time.time) -> None:
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._studies: dict[str, StudyProgress] = {}
        self.settled = 0  # studies that went idle since start
        self._changed = False

    def saw(self, study_uid: str) -> None:
        now = self._clock()
        with self._lock:
            progress = self._studies.get(study_uid)
            if progress is None:
                self._studies[study_uid] = StudyProgress(1, now, now)
            else:
                progress.instances += 1
                progress.last_seen = now
            self._changed = True

    def settle(self) -> int:
        """Forget the studies idle for ``idle_seconds``; return how many settled now."""
        cutoff = self._clock() - self.idle_seconds
        with self._lock:
            idle = [uid for uid, p in self._studies.items() if p.last_seen <= cutoff]
            for uid in idle:
                del self._studies[uid]
            self.settled += len(idle)
            if idle:
                self._changed = True
            return len(idle)

    def receiving(self) -> dict[str, StudyProgress]:
        with self._lock:
            return {uid: StudyProgress(**vars(p)) for uid, p in self._studies.items()}

    def take_changed(self) -> bool:
        with self._lock:
            changed, self._changed = self._changed, False
            return changed


def studies_receiving(drop_folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The studies a receiver on ``drop_folder`` reported as still receiving (empty when no
    receiver state exists). Values: instances, first_seen, last_seen (POSIX times)."""
    path = Path(drop_folder) / STATE_DIR / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return dict(state.get("receiving", {}))


# -- the SCP -----------------------------------------------------------------------------------


@dataclass
class ReceiverCounts:
    """What the receiver has done since it started (all associations together)."""

    stored: int = 0
    refused: int = 0  # SOP class not accepted
    rejected: int = 0  # data set contradicts its command or cannot be decoded
    failed: int = 0  # could not be written (sender will retry)
    associations: int = 0
    associations_rejected: int = 0
    bytes_stored: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _AssociationCounts:
    stored: int = 0
    refused: int = 0
    rejected: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)


class Receiver:
    """The storage SCP. ``start()`` returns once it listens; ``stop()`` waits for nothing in
    flight to be half-written (each instance is either renamed and acknowledged, or not)."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self.counts = ReceiverCounts()
        self.tracker = StudyTracker(config.study_idle_seconds)
        self._lock = threading.Lock()
        self._per_association: dict[int, _AssociationCounts] = {}
        self._server = None
        self._state_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- life cycle

    def start(self) -> None:
        folder = self.config.drop_folder
        if not folder.is_dir():
            raise ReceiverError(f"the drop folder {folder} does not exist or is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ReceiverError(f"the drop folder {folder} is not writable by this user")
        removed = remove_stale_temporaries(folder)
        if removed:
            logger.info("removed %d unacknowledged temporary file(s) of an earlier run", removed)
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.network_timeout = self.config.network_timeout
        ae.dimse_timeout = self.config.dimse_timeout
        ae.acse_timeout = self.config.acse_timeout
        ae.add_supported_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        from pynetdicom import AllStoragePresentationContexts

        storage = {cx.abstract_syntax for cx in AllStoragePresentationContexts}
        for sop_class in sorted(storage | set(self.config.accepted_sop_classes)):
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self._server = ae.start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise ReceiverError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        self._state_thread = threading.Thread(
            target=self._maintain_state, name="receiver-state", daemon=True
        )
        self._state_thread.start()
        logger.info(
            "listening as %s on %s:%d, writing to the drop folder, at most %d associations",
            self.config.ae_title,
            self.config.host,
            self.port,
            self.config.max_associations,
        )

    @property
    def port(self) -> int:
        """The port actually listened on (useful with ``port=0``)."""
        if self._server is None:
            return self.config.port
        return self._server.server_address[1]

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._state_thread is not None:
            self._state_thread.join(timeout=5)
            self._state_thread = None
        self.tracker.settle()
        self._write_state()
        logger.info("stopped; totals: %s", _describe(self.counts.as_dict()))

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- events

    def _on_established(self, event) -> None:
        with self._lock:
            self.counts.associations += 1
            self._per_association[id(event.assoc)] = _AssociationCounts()

    def _on_closed(self, event) -> None:
        with self._lock:
            per = self._per_association.pop(id(event.assoc), None)
        if per is None:
            return
        how = "released" if event.event.name == "EVT_RELEASED" else "aborted"
        requestor = event.assoc.requestor
        logger.info(
            "association from %s (%s) %s after %.1f s: stored %d, refused %d, rejected %d, "
            "failed %d",
            requestor.ae_title,
            requestor.address,
            how,
            time.monotonic() - per.started,
            per.stored,
            per.refused,
            per.rejected,
            per.failed,
        )

    def _on_rejected(self, event) -> None:
        with self._lock:
            self.counts.associations_rejected += 1
        requestor = event.assoc.requestor
        logger.warning(
            "rejected an association from %s (%s): it did not call %s, its AE title is not "
            "allowed, or %d associations were already open",
            requestor.ae_title,
            requestor.address,
            self.config.ae_title,
            self.config.max_associations,
        )

    def _count(self, event, what: str, nbytes: int = 0) -> None:
        with self._lock:
            setattr(self.counts, what, getattr(self.counts, what) + 1)
            self.counts.bytes_stored += nbytes
            per = self._per_association.get(id(event.assoc))
            if per is not None:
                setattr(per, what, getattr(per, what) + 1)

    def _on_store(self, event) -> int:
        """Store one instance; the answer is sent only after the file is durable."""
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "").strip()
        if sop_class not in self.config.accepted_sop_classes:
            self._count(event, "refused")
            return REFUSED_SOP_CLASS_NOT_SUPPORTED
        try:
            encoded = event.encoded_dataset(include_meta=True)
            header = pydicom.dcmread(
                io.BytesIO(encoded),
                stop_before_pixels=True,
                specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
            )
            study_uid = str(header.get("StudyInstanceUID", "") or "").strip()
            ds_class = str(header.get("SOPClassUID", "") or "").strip()
            ds_instance = str(header.get("SOPInstanceUID", "") or "").strip()
        except Exception:  # pydicom raises many types on malformed data
            self._count(event, "rejected")
            return ERROR_CANNOT_UNDERSTAND
        if not sop_instance or ds_class != sop_class or ds_instance != sop_instance:
            self._count(event, "rejected")
            return ERROR_DATASET_DOES_NOT_MATCH
        try:
            write_atomically(self.config.drop_folder, instance_file_name(sop_instance), [encoded])
        except OSError as exc:
            self._count(event, "failed")
            logger.error(
                "could not write a received instance to the drop folder (%s); answered "
                "0xA700 so the sender retries",
                exc.strerror or type(exc).__name__,
            )
            return REFUSED_OUT_OF_RESOURCES
        self._count(event, "stored", len(encoded))
        if study_uid:
            self.tracker.saw(study_uid)
        return SUCCESS

    # -- state file

    def _maintain_state(self) -> None:
        interval = min(2.0, self.config.study_idle_seconds / 4)
        while not self._stopping.wait(interval):
            self.tracker.settle()
            if self.tracker.take_changed():
                self._write_state()

    def _write_state(self) -> None:
        receiving = self.tracker.receiving()
        state = {
            "pid": os.getpid(),
            "ae_title": self.config.ae_title,
            "port": self.port,
            "study_idle_seconds": self.config.study_idle_seconds,
            "updated_at": time.time(),
            "counts": self.counts.as_dict(),
            "studies_settled": self.tracker.settled,
            "receiving": {uid: vars(p) for uid, p in sorted(receiving.items())},
        }
        try:
            (self.config.drop_folder / STATE_DIR).mkdir(mode=0o700, exist_ok=True)
            write_atomically(
                self.config.drop_folder, f"{STATE_DIR}/{STATE_FILE}", [json.dumps(state).encode()]
            )
        except OSError as exc:
            logger.warning("could not write the receiver state file: %s", exc.strerror or exc)


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
