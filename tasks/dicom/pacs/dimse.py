"""DIMSE query/retrieve with pynetdicom: C-ECHO, C-FIND, and C-MOVE or C-GET.

- **C-FIND** (Study Root) at study, series and image level. There is no paging in DIMSE: a
  PACS that caps its answers either says so (status A700 "out of resources", or FE00 as
  Orthanc does at its LimitFindResults) or does not
  (``query_cap`` in the entry says where its cap is); either way the study-date window is
  split (``source.find_studies``).
- **C-MOVE** to our own C-STORE SCP: a short-lived pynetdicom server on ``move_port`` that
  accepts associations from the PACS's AE title only, proposes nothing and accepts every
  storage SOP class in every common transfer syntax (so the PACS sends what it stores, without
  transcoding). The PACS must know our AE title (``calling_aet``) at this host and port.
  One C-MOVE per series (per instance for retries), on an association each worker keeps open
  for many requests.
- **C-GET** where the PACS allows it: the instances come back on our own association (SCP role
  negotiated for CR, DX and Secondary Capture), no inbound port needed.

Presentation contexts propose JPEG 2000 (lossless and lossy), JPEG-LS, lossless JPEG, RLE,
HTJ2K, JPEG baseline/extended, deflated, explicit and implicit little endian, explicit big
endian: a peer that stores only JPEG 2000 does not reject us, and what arrives is what the
PACS holds. Completeness by count: C-FIND's NumberOfSeriesRelatedInstances.

The bytes kept are the data set as it came over the wire with a file meta header in front
(``event.encoded_dataset()``): no decoding, no transcoding. They differ from the PACS's stored
file only in the file meta header.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
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

from tasks.dicom.pacs.common import (
    EchoResult,
    InstanceFailure,
    InstanceRef,
    PacsAuthError,
    PacsError,
    PacsProtocolError,
    PacsUnreachable,
    SeriesMatch,
    StudyMatch,
    StudyWindow,
)
from tasks.dicom.pacs.config import PacsEntry

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
VERIFICATION = "1.2.840.10008.1.1"
GET_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
MOVE_BATCH = 64  # instances per C-MOVE/C-GET unit (a series, or a slice of a large one)
_PENDING = (0xFF00, 0xFF01)
# Statuses of a C-FIND that ended before all matches were sent: out of resources, and
# "matching terminated due to cancel", which Orthanc answers when LimitFindResults is reached.
_CAP_STATUS = (0xA700, 0xA701, 0xA702, 0xFE00)


def _quiet_pynetdicom() -> None:
    """pynetdicom logs every association and message at INFO, and rejections at ERROR with
    the peer's details; our own messages say what matters (counts, one line on failure)."""
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)


class DimseClient:
    """One DIMSE PACS. Thread-safe: each thread keeps its own association (reopened when the
    PACS has closed it); C-MOVE destinations are served by one shared SCP."""

    scheme = "dimse"
    supports_offset = False

    def __init__(
        self,
        entry: PacsEntry,
        *,
        backoff: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        if entry.kind != "dimse" or not (entry.aet and entry.host and entry.port):
            raise ValueError(f"{entry.describe()} is not a DIMSE PACS")
        _quiet_pynetdicom()
        self.entry = entry
        self.name = entry.name
        self._backoff = backoff
        self._backoff_cap = backoff_cap
        self._local = threading.local()
        self._lock = threading.Lock()
        self._associations: list[Any] = []
        self._scp: _MoveDestination | None = None
        self._get_inbox = _Inbox()

    def _where(self) -> str:
        return f"PACS {self.name!r} (DIMSE {self.entry.aet}@{self.entry.host}:{self.entry.port})"

    # --- associations --------------------------------------------------------------------------

    def _ae(self, contexts: list[tuple[str, list[str]]], get_roles: bool = False):
        from pynetdicom import AE, build_role

        ae = AE(ae_title=self.entry.calling_aet)
        ae.acse_timeout = min(30.0, self.entry.timeout)
        ae.dimse_timeout = self.entry.timeout
        ae.network_timeout = self.entry.timeout
        ae.connection_timeout = min(10.0, self.entry.timeout)
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        roles = [build_role(uid, scp_role=True) for uid in GET_STORAGE_CLASSES] if get_roles else []
        return ae, roles

    def _associate(self, purpose: str, handlers: list | None = None):
        """A new association for ``purpose`` ("find", "move", "get", "echo")."""
        if purpose == "get":
            contexts = [(STUDY_ROOT_GET, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
            # One context per (SOP class, transfer syntax): the PACS picks one syntax per
            # context, and can then send each instance in the syntax it stores it in.
            contexts += [(uid, [ts]) for uid in GET_STORAGE_CLASSES for ts in TRANSFER_SYNTAXES]
        else:
            model = {"find": STUDY_ROOT_FIND, "move": STUDY_ROOT_MOVE, "echo": VERIFICATION}[
                purpose
            ]
            contexts = [(model, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        ae, roles = self._ae(contexts, get_roles=purpose == "get")
        kwargs: dict[str, Any] = {"ae_title": self.entry.aet, "ext_neg": roles or None}
        if handlers:
            kwargs["evt_handlers"] = handlers
        if self.entry.tls:
            context = ssl.create_default_context(cafile=self.entry.ca_bundle)
            if not self.entry.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            kwargs["tls_args"] = (context, self.entry.host)
        assoc = ae.associate(self.entry.host, self.entry.port, **kwargs)
        if assoc.is_established:
            _no_delay(assoc)
            return assoc
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            reason = getattr(primitive, "reason_str", "no reason given")
            transient = getattr(primitive, "result", 1) == 0x02
            message = (
                f"{self._where()} rejected the association from {self.entry.calling_aet!r}: "
                f"{reason}"
            )
            if transient:
                raise _Transient(message)
            raise PacsAuthError(
                message + " (is our AE title configured in the PACS?)"
                if "AE title" in reason
                else message
            )
        raise _Transient(self._connect_reason(), network=True)

    def _silence(self, assoc, verb: str, started: float) -> str:
        """Why a request got no valid answer: the PACS ended the association or refused the
        request (quickly), or time ran out."""
        waited = time.monotonic() - started
        if assoc.is_aborted or not assoc.is_established or waited < 0.9 * self.entry.timeout:
            return (
                f"the PACS refused our {verb} or ended the association (does it allow AE title "
                f"{self.entry.calling_aet!r} to do this?)"
            )
        return f"no {verb} answer within {self.entry.timeout:g} s"

    def _connect_reason(self) -> str:
        """Why the association could not be made, found by opening a plain TCP connection."""
        try:
            with socket.create_connection(
                (self.entry.host, self.entry.port), timeout=min(10.0, self.entry.timeout)
            ):
                pass
        except ConnectionRefusedError:
            return "connection refused"
        except socket.gaierror:
            return "host name not found"
        except TimeoutError:
            return f"no answer within {min(10.0, self.entry.timeout):g} s"
        except OSError as exc:
            return (exc.strerror or str(exc)).lower()
        return "the PACS accepted the connection but not the association (aborted)"

    def _thread_assoc(self, purpose: str, handlers: list | None = None):
        """This thread's open association for ``purpose``, opened when needed."""
        key = f"assoc_{purpose}"
        assoc = getattr(self._local, key, None)
        if assoc is not None and assoc.is_established:
            return assoc
        assoc = self._associate(purpose, handlers)
        setattr(self._local, key, assoc)
        with self._lock:
            self._associations.append(assoc)
        return assoc

    def _drop_thread_assoc(self, purpose: str) -> None:
        assoc = getattr(self._local, f"assoc_{purpose}", None)
        if assoc is not None:
            assoc.abort()
            setattr(self._local, f"assoc_{purpose}", None)

    def close(self) -> None:
        with self._lock:
            associations, self._associations = self._associations, []
            scp, self._scp = self._scp, None
        for assoc in associations:
            if assoc.is_established:
                assoc.release()
        if scp is not None:
            scp.stop()

    def _attempts(self, what: str, call, retries: int | None = None):
        retries = self.entry.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return call()
            except _Transient as exc:
                if attempt < retries:
                    time.sleep(min(self._backoff_cap, self._backoff * 2**attempt))
                    continue
                tries = f" ({attempt + 1} attempts)" if attempt else ""
                if exc.network:
                    raise PacsUnreachable(f"{self._where()} is unreachable: {exc}{tries}") from None
                raise PacsError(f"{self._where()} failed {what}: {exc}{tries}") from None
        raise AssertionError("unreachable")

    # --- C-ECHO ----------------------------------------------------------------------------------

    def echo(self) -> EchoResult:
        started = time.perf_counter()

        def once():
            assoc = self._associate("echo")
            try:
                status = assoc.send_c_echo()
            finally:
                assoc.release()
            code = getattr(status, "Status", None)
            if code is None:
                raise _Transient("no C-ECHO response (timeout or aborted association)")
            if code != 0x0000:
                raise PacsProtocolError(f"{self._where()} answered C-ECHO with status 0x{code:04X}")

        self._attempts("C-ECHO", once, retries=0)
        detail = f"{self.entry.aet}@{self.entry.host}:{self.entry.port}"
        return EchoResult(self.name, "C-ECHO", time.perf_counter() - started, detail)

    # --- C-FIND ----------------------------------------------------------------------------------

    def _find(self, identifier: Dataset, what: str) -> tuple[list[Dataset], bool]:
        """All matches of one C-FIND and whether the PACS said it stopped early (A700)."""

        def once():
            assoc = self._thread_assoc("find")
            matches: list[Dataset] = []
            capped = False
            started = time.monotonic()
            try:
                for status, found in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
                    code = getattr(status, "Status", None)
                    if code is None:
                        raise _Transient(self._silence(assoc, "C-FIND", started))
                    if code in _PENDING:
                        started = time.monotonic()
                        if found is not None:
                            matches.append(found)
                    elif code == 0x0000:
                        break
                    elif code in _CAP_STATUS:
                        capped = True  # we never cancel: the PACS stopped matching early
                        break
                    else:
                        raise PacsProtocolError(
                            f"{self._where()} answered {what} with status 0x{code:04X}"
                            + (
                                " (refused: is our AE title allowed to query?)"
                                if code in (0x0122, 0xA900, 0x0124) or code >> 8 == 0xC0
                                else ""
                            )
                        )
            except _Transient:
                self._drop_thread_assoc("find")
                raise
            return matches, capped

        return self._attempts(what, once)

    def study_page(
        self,
        window: StudyWindow | None,
        modality: str | None,
        offset: int,
        study_uid: str = "",
        limit: int | None = None,
    ) -> tuple[list[StudyMatch], bool]:
        if offset:
            return [], False
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = window.dicom() if window is not None else ""
        ds.ModalitiesInStudy = modality or ""
        ds.NumberOfStudyRelatedInstances = ""
        found, capped = self._find(ds, "the study C-FIND")
        matches = []
        for item in found:
            uid = _text(item, "StudyInstanceUID")
            if not uid:
                continue
            mods = item.get("ModalitiesInStudy")
            matches.append(
                StudyMatch(
                    study_uid=uid,
                    study_date=_text(item, "StudyDate"),
                    modalities=tuple(str(m) for m in _multi(mods)),
                    announced=_int(item, "NumberOfStudyRelatedInstances"),
                )
            )
        cap = self.entry.query_cap
        return matches, capped or (cap is not None and len(found) >= cap)

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.Modality = ""
        ds.BodyPartExamined = ""
        ds.NumberOfSeriesRelatedInstances = ""
        found, capped = self._find(ds, "the series C-FIND")
        if capped:
            raise PacsError(f"{self._where()} capped the series C-FIND of study {study_uid}")
        out: dict[str, SeriesMatch] = {}
        for item in found:
            uid = _text(item, "SeriesInstanceUID")
            if uid:
                out[uid] = SeriesMatch(
                    study_uid=study_uid,
                    series_uid=uid,
                    modality=_text(item, "Modality"),
                    body_part=_text(item, "BodyPartExamined"),
                    announced=_int(item, "NumberOfSeriesRelatedInstances"),
                )
        return list(out.values())

    def find_instances(self, series: SeriesMatch) -> list[InstanceRef]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = series.study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.SOPInstanceUID = ""
        ds.SOPClassUID = ""
        found, capped = self._find(ds, "the image C-FIND")
        if capped:
            raise PacsError(
                f"{self._where()} capped the image C-FIND of series {series.series_uid}"
            )
        out: dict[str, InstanceRef] = {}
        for item in found:
            uid = _text(item, "SOPInstanceUID")
            if uid:
                out[uid] = InstanceRef(
                    series.study_uid, series.series_uid, uid, _text(item, "SOPClassUID")
                )
        return list(out.values())

    # --- C-MOVE / C-GET --------------------------------------------------------------------------

    def work_units(self, series: SeriesMatch, refs: list[InstanceRef]) -> list[list[InstanceRef]]:
        """A series per unit (one C-MOVE), large series in slices of ``MOVE_BATCH``."""
        return [refs[i : i + MOVE_BATCH] for i in range(0, len(refs), MOVE_BATCH)]

    def retrieve(
        self, unit: list[InstanceRef]
    ) -> Iterator[tuple[InstanceRef, bytes | InstanceFailure]]:
        """Retrieve a unit: the whole series in one request when the unit is the whole listed
        series, else instance by instance; missing instances are asked for again one by one,
        up to ``retries`` times, then failed with the PACS's last word."""
        inbox = self._inbox()
        wanted = {ref.sop_uid: ref for ref in unit}
        inbox.expect(wanted)
        got: dict[str, bytes] = {}
        last: dict[str, str] = {}
        try:
            for attempt in range(self.entry.retries + 1):
                missing = [ref for uid, ref in wanted.items() if uid not in got]
                if not missing:
                    break
                if attempt:
                    time.sleep(min(self._backoff_cap, self._backoff * 2 ** (attempt - 1)))
                whole_series = attempt == 0 and len(unit) < MOVE_BATCH
                asks: list[InstanceRef | None] = [None] if whole_series else list(missing)
                for ref in asks:
                    try:
                        note = self._request(unit[0] if ref is None else ref, ref is None)
                    except _Transient as exc:
                        note = str(exc)
                        self._drop_thread_assoc(self.entry.retrieve)
                    got.update(inbox.collect(wanted))
                    for uid in wanted if ref is None else [ref.sop_uid]:
                        if uid not in got:
                            last[uid] = note
        finally:
            inbox.forget(wanted)
        verb = "C-MOVE" if self.entry.retrieve == "move" else "C-GET"
        for uid, ref in wanted.items():
            if uid in got:
                yield ref, got[uid]
            else:
                yield (
                    ref,
                    InstanceFailure(
                        f"PACS {self.name!r} did not send instance {uid} over {verb} after "
                        f"{self.entry.retries + 1} attempt(s): {last.get(uid, 'no reason given')}",
                        transient=True,
                    ),
                )

    def _request(self, ref: InstanceRef, whole_series: bool) -> str:
        """One C-MOVE or C-GET on this thread's association; returns the PACS's final word."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES" if whole_series else "IMAGE"
        ds.StudyInstanceUID = ref.study_uid
        ds.SeriesInstanceUID = ref.series_uid
        if not whole_series:
            ds.SOPInstanceUID = ref.sop_uid
        if self.entry.retrieve == "move":
            assoc = self._thread_assoc("move")
            responses = assoc.send_c_move(ds, self.entry.calling_aet, STUDY_ROOT_MOVE)
        else:
            inbox = self._inbox()
            assoc = self._thread_assoc("get", handlers=[(_store_event(), inbox.on_store)])
            responses = assoc.send_c_get(ds, STUDY_ROOT_GET)
        verb = "C-MOVE" if self.entry.retrieve == "move" else "C-GET"
        final = None
        started = time.monotonic()
        for status, _identifier in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise _Transient(self._silence(assoc, verb, started))
            if code in _PENDING:
                started = time.monotonic()
                continue
            final = status
            break
        if final is None:
            raise _Transient(f"the {verb} ended without a final status")
        code = final.Status
        if code == 0xA801:
            raise PacsAuthError(
                f"{self._where()} does not know our AE title {self.entry.calling_aet!r} as a "
                f"C-MOVE destination (status 0xA801); register it in the PACS at this host, "
                f"port {self.entry.move_port}"
            )
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        return f"{verb} status 0x{code:04X}" + (
            f", {failed} failed sub-operation(s)" if failed else ""
        )

    def _inbox(self) -> _Inbox:
        """Where retrieved instances land: our C-MOVE destination's (started on first use), or
        the one C-GET associations deliver to."""
        if self.entry.retrieve == "get":
            return self._get_inbox
        with self._lock:
            if self._scp is None:
                self._scp = _MoveDestination(self.entry)
            return self._scp.inbox


def _no_delay(assoc) -> None:
    """TCP_NODELAY on an association's socket. pynetdicom writes a message's command and data
    set as separate PDUs; with Nagle's algorithm on, the second waits for the peer's delayed
    ACK (~40 ms on Linux): a C-FIND took 50-90 ms on loopback instead of ~2 ms."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Transient(Exception):
    def __init__(self, reason: str, network: bool = False) -> None:
        super().__init__(reason)
        self.network = network


def _store_event():
    from pynetdicom import evt

    return evt.EVT_C_STORE


class _Inbox:
    """Instances received by C-STORE, kept only when some worker expects them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: set[str] = set()
        self._received: dict[str, bytes] = {}
        self.unexpected = 0

    def expect(self, uids) -> None:
        with self._lock:
            self._expected.update(uids)

    def forget(self, uids) -> None:
        with self._lock:
            for uid in uids:
                self._expected.discard(uid)
                self._received.pop(uid, None)

    def collect(self, uids) -> dict[str, bytes]:
        with self._lock:
            return {uid: self._received.pop(uid) for uid in list(uids) if uid in self._received}

    def on_store(self, event) -> int:
        """pynetdicom's C-STORE handler: keep the bytes as they came (no decoding)."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        with self._lock:
            if uid not in self._expected:
                self.unexpected += 1
                return 0x0000  # answered, not kept: nobody asked for it in this run
        data = event.encoded_dataset(include_meta=True)
        with self._lock:
            if uid in self._expected:
                self._received[uid] = data
        return 0x0000


class _MoveDestination:
    """Our C-STORE SCP for C-MOVE: listens on ``move_port`` while the run retrieves, accepts
    associations only from the PACS's AE title."""

    def __init__(self, entry: PacsEntry) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        if entry.move_port is None:
            raise PacsError(
                f"PACS {entry.name!r}: C-MOVE needs move_port (the port of our C-STORE SCP, "
                f"registered in the PACS for AE title {entry.calling_aet!r}), or retrieve = get"
            )
        self.inbox = _Inbox()
        ae = AE(ae_title=entry.calling_aet)
        ae.require_calling_aet = [entry.aet]
        ae.maximum_associations = max(4, 2 * entry.connections)
        ae.network_timeout = entry.timeout
        ae.dimse_timeout = entry.timeout
        ae.maximum_pdu_size = 0  # no limit: large radiographs in few PDUs
        for context in AllStoragePresentationContexts[:120]:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            self._server = ae.start_server(
                (entry.move_bind, entry.move_port),
                block=False,
                evt_handlers=[
                    (evt.EVT_C_STORE, self.inbox.on_store),
                    (evt.EVT_CONN_OPEN, lambda event: _no_delay(event.assoc)),
                ],
            )
        except OSError as exc:
            raise PacsError(
                f"PACS {entry.name!r}: our C-STORE SCP cannot listen on "
                f"{entry.move_bind}:{entry.move_port} ({exc.strerror or exc})"
            ) from None

    def stop(self) -> None:
        self._server.shutdown()


# --- reading C-FIND answers (UIDs, dates and counts only) ------------------------------------


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if not isinstance(value, str | int | float):
        value = next(iter(_multi(value)), None)
        if value is None:
            return None
    text = str(value).strip("\x00 ")
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None


def _multi(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return [v for v in value if v not in (None, "")]
    except TypeError:
        return [value]
