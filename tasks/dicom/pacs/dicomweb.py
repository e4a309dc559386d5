"""DICOMweb: QIDO-RS queries through ``dicomweb-client``, WADO-RS instance retrieval of our own.

Queries (``search_for_studies/series/instances``) go through dicomweb-client with explicit
``limit``/``offset`` (never its ``get_remaining``, which pages until an empty page and so loops
for ever on a server that ignores ``offset``), its own retries off (ours also cover connection
errors, timeouts, 500/502 and ``Retry-After``), and a response hook that keeps the ``Warning``
header it would only log (a server says with it that a page was capped).

Retrieval does not use dicomweb-client's ``retrieve_instance``, for reasons that matter here:
it returns a pydicom ``Dataset`` parsed from the bytes instead of the bytes (re-encoding it
would change the content hash the pipeline keys duplicates on, and costs a full parse); its
multipart reader takes a body that stops before the closing boundary as a complete last part
(a body cut short would reach the decoder as a truncated file); and it cannot fall back from
``transfer-syntax=*`` on a 406. So WADO-RS is a plain ``GET`` on the same kind of session:

1. ``Accept: multipart/related; type="application/dicom"; transfer-syntax=*`` (the stored
   encoding, no transcoding on the server);
2. on 406, the lossless syntaxes the pixel path decodes (JPEG 2000, JPEG-LS, lossless JPEG,
   RLE), then explicit VR little endian, then no transfer-syntax parameter at all. The first
   that works is remembered for the rest of the run.

Each answer must be a complete multipart body (closing boundary present) with one DICOM part,
or a bare ``application/dicom`` body (some servers), and the part's SOP Instance UID must be
the one asked for.
"""

from __future__ import annotations

import io
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter

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

T = TypeVar("T")

DICOM_MEDIA = 'multipart/related; type="application/dicom"'
LOSSLESS_SYNTAXES = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG lossless (process 14)
    "1.2.840.10008.1.2.5",  # RLE lossless
)
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ACCEPT_ORDER = (
    f"{DICOM_MEDIA}; transfer-syntax=*",
    ", ".join(
        f"{DICOM_MEDIA}; transfer-syntax={uid}; q={1 - i / 10:.1f}"
        for i, uid in enumerate((*LOSSLESS_SYNTAXES, EXPLICIT_LE))
    ),
    f"{DICOM_MEDIA}; transfer-syntax={EXPLICIT_LE}",
    DICOM_MEDIA,
)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_INSTANCE_BYTES = 4 * 1024**3
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

STUDY_FIELDS = (
    "StudyInstanceUID",
    "StudyDate",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)
SERIES_FIELDS = (
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_FIELDS = ("SOPInstanceUID", "SOPClassUID")
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "StudyDate": "00080020",
    "ModalitiesInStudy": "00080061",
    "NumberOfStudyRelatedInstances": "00201208",
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
    "BodyPartExamined": "00180015",
    "NumberOfSeriesRelatedInstances": "00201209",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
}


def _quiet_retrying() -> None:
    """dicomweb-client's ``retrying`` decorator logs every failed request as a WARNING with a
    traceback, even with its retries off; ours say once, in one line, what failed."""
    logger = logging.getLogger("retrying")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)


class _Transient(Exception):
    """A failure worth another attempt; ``retry_after`` is the server's wish, in seconds;
    ``network``: no HTTP answer at all (refused, timed out, cut off)."""

    def __init__(self, reason: str, retry_after: float | None = None, network: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.network = network


class DicomWebClient:
    """One DICOMweb PACS: echo, QIDO-RS pages, WADO-RS instances. Thread-safe: each thread
    gets its own HTTP session (one keep-alive connection each)."""

    scheme = "dicomweb"
    supports_offset = True

    def __init__(
        self,
        entry: PacsEntry,
        *,
        backoff: float = 0.5,
        backoff_cap: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if entry.kind != "dicomweb" or not entry.url:
            raise ValueError(f"{entry.describe()} is not a DICOMweb PACS")
        _quiet_retrying()
        self.entry = entry
        self.name = entry.name
        self._backoff = backoff
        self._backoff_cap = backoff_cap
        self._sleep = sleep
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._accept_start = 0  # index into ACCEPT_ORDER of the first Accept that worked

    # --- sessions ---------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.verify = self.entry.verify
            if self.entry.token is not None:
                session.auth = _Bearer(self.entry.token.reveal())
            elif self.entry.username is not None:
                password = self.entry.password.reveal() if self.entry.password else ""
                session.auth = (self.entry.username, password)
            session.headers["User-Agent"] = "cxr-screen"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _qido(self):
        client = getattr(self._local, "qido", None)
        if client is None:
            from dicomweb_client.api import DICOMwebClient

            local = self._local

            def keep_warning(response, *args, **kwargs):
                local.warning = response.headers.get("Warning")
                return response

            client = DICOMwebClient(
                url=self.entry.url,
                session=self._session(),
                callback=keep_warning,
                timeout=(min(10.0, self.entry.timeout), self.entry.timeout),
            )
            client.set_http_retry_params(retry=False)
            self._local.qido = client
        return client

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # --- errors and retries -----------------------------------------------------------------------

    def _where(self) -> str:
        return f"PACS {self.name!r} (DICOMweb {self.entry.url})"

    def _attempts(self, what: str, call: Callable[[], T], retries: int | None = None) -> T:
        """``call()`` with retries on transient failures; fatal ones raise ``PacsError``."""
        retries = self.entry.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return call()
            except _Transient as exc:
                if attempt < retries:
                    self._pause(attempt, exc.retry_after)
                    continue
                tries = f" ({attempt + 1} attempts)" if attempt else ""
                if exc.network:
                    raise PacsUnreachable(f"{self._where()} is unreachable: {exc}{tries}") from None
                raise PacsError(f"{self._where()} failed {what}: {exc}{tries}") from None
        raise AssertionError("unreachable")

    def _pause(self, attempt: int, retry_after: float | None) -> None:
        delay = min(self._backoff_cap, self._backoff * 2**attempt)
        delay *= random.uniform(0.8, 1.2)
        if retry_after is not None:
            delay = min(self._backoff_cap, max(delay, retry_after))
        self._sleep(delay)

    def _check_status(self, response: requests.Response, what: str) -> None:
        code = response.status_code
        if code < 400:
            return
        if code in (401, 403):
            raise PacsAuthError(
                f"{self._where()} refused {_who(self.entry)}: HTTP {code} "
                f"{_reason_phrase(response)} (check the username and password or token)"
            )
        if code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {code} {_reason_phrase(response)}", _retry_after(response))
        raise PacsProtocolError(
            f"{self._where()} answered {what} with HTTP {code} {_reason_phrase(response)}"
        )

    # --- echo -------------------------------------------------------------------------------------

    def echo(self) -> EchoResult:
        """A QIDO-RS ping: one study-level query for one study (no retries)."""
        started = time.perf_counter()
        self._attempts(
            "a QIDO-RS ping",
            lambda: self._search("studies", {}, ("StudyInstanceUID",), limit=1, offset=0),
            retries=0,
        )
        return EchoResult(self.name, "QIDO-RS", time.perf_counter() - started, self.entry.url or "")

    # --- QIDO-RS ---

    def _search(
        self,
        level: str,
        filters: dict[str, str],
        fields: Iterable[str],
        *,
        limit: int,
        offset: int,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> tuple[list[dict], str | None]:
        """One QIDO-RS page: (matches as DICOM JSON objects, the Warning header or None)."""
        client = self._qido()
        self._local.warning = None
        kwargs: dict[str, Any] = {
            "limit": limit,
            "offset": offset,
            "fields": list(fields),
            "search_filters": filters or None,
        }
        what = {"studies": "the study query", "series": "the series query"}.get(
            level, "the instance query"
        )
        try:
            if level == "studies":
                answer = client.search_for_studies(**kwargs)
            elif level == "series":
                answer = client.search_for_series(study_instance_uid=study_uid, **kwargs)
            else:
                answer = client.search_for_instances(
                    study_instance_uid=study_uid, series_instance_uid=series_uid, **kwargs
                )
        except requests.HTTPError as exc:
            self._check_status(exc.response, what)
            raise
        except requests.JSONDecodeError:
            # The body is not quoted: it may hold patient data.
            raise PacsProtocolError(
                f"{self._where()} answered {what} with malformed JSON (not DICOM JSON)"
            ) from None
        except requests.RequestException as exc:
            raise self._network(exc) from None
        if not isinstance(answer, list) or not all(isinstance(m, dict) for m in answer):
            raise PacsProtocolError(
                f"{self._where()} answered {what} with JSON that is not a list of DICOM objects"
            )
        return answer, getattr(self._local, "warning", None)

    def _network(self, exc: requests.RequestException) -> Exception:
        reason = network_reason(exc, self.entry.timeout)
        if isinstance(exc, requests.exceptions.SSLError):
            return PacsUnreachable(f"{self._where()}: {reason}")
        if isinstance(
            exc,
            requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError,
        ):
            return _Transient(reason, network=True)
        return PacsProtocolError(f"{self._where()}: {reason}")

    def study_page(
        self,
        window: StudyWindow | None,
        modality: str | None,
        offset: int,
        study_uid: str = "",
        limit: int | None = None,
    ) -> tuple[list[StudyMatch], bool]:
        """One page of studies in ``window`` with ``modality`` in the study; ``full`` says the
        page was capped (as many as the limit, or a Warning header)."""
        filters: dict[str, str] = {}
        if window is not None:
            filters["StudyDate"] = window.dicom()
        if modality:
            filters["ModalitiesInStudy"] = modality
        if study_uid:
            filters["StudyInstanceUID"] = study_uid
        limit = limit or self.entry.page_size
        answer, warning = self._attempts(
            "the study query",
            lambda: self._search("studies", filters, STUDY_FIELDS, limit=limit, offset=offset),
        )
        matches = []
        for item in answer:
            uid = _text(item, "StudyInstanceUID")
            if uid is None or not _UID.match(uid):
                raise PacsProtocolError(
                    f"{self._where()} answered the study query with a match without a valid "
                    "Study Instance UID"
                )
            matches.append(
                StudyMatch(
                    study_uid=uid,
                    study_date=_text(item, "StudyDate"),
                    modalities=tuple(_values(item, "ModalitiesInStudy")),
                    announced=_int(item, "NumberOfStudyRelatedInstances"),
                )
            )
        full = len(answer) >= limit or bool(warning) or _at_cap(len(answer), self.entry)
        return matches, full

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        items = self._all_pages("series", SERIES_FIELDS, "SeriesInstanceUID", study_uid=study_uid)
        return [
            SeriesMatch(
                study_uid=study_uid,
                series_uid=uid,
                modality=_text(item, "Modality"),
                body_part=_text(item, "BodyPartExamined"),
                announced=_int(item, "NumberOfSeriesRelatedInstances"),
            )
            for uid, item in items
        ]

    def find_instances(self, series: SeriesMatch) -> list[InstanceRef]:
        items = self._all_pages(
            "instances",
            INSTANCE_FIELDS,
            "SOPInstanceUID",
            study_uid=series.study_uid,
            series_uid=series.series_uid,
        )
        return [
            InstanceRef(series.study_uid, series.series_uid, uid, _text(item, "SOPClassUID"))
            for uid, item in items
        ]

    def _all_pages(
        self, level: str, fields: tuple[str, ...], key: str, **uids: str
    ) -> list[tuple[str, dict]]:
        """Every match of a series or instance query, page by page; stops when a page is not
        full, or brings nothing new (a server that ignores ``offset``)."""
        limit = self.entry.page_size
        seen: dict[str, dict] = {}
        offset = 0
        while True:
            page, warning = self._attempts(
                f"the {level} query",
                lambda o=offset: self._search(level, {}, fields, limit=limit, offset=o, **uids),
            )
            new = 0
            for item in page:
                uid = _text(item, key)
                if uid is None or not _UID.match(uid):
                    raise PacsProtocolError(
                        f"{self._where()} listed a {level[:-1] if level != 'series' else level} "
                        f"without a valid {key}"
                    )
                if uid not in seen:
                    seen[uid] = item
                    new += 1
            full = len(page) >= limit or bool(warning)
            if not full or new == 0:
                break
            offset += len(page)
        return list(seen.items())

    # --- WADO-RS ---

    def work_units(self, series: SeriesMatch, refs: list[InstanceRef]) -> list[list[InstanceRef]]:
        """One request per instance: the connections share a series' instances."""
        return [[ref] for ref in refs]

    def retrieve(
        self, unit: list[InstanceRef]
    ) -> Iterator[tuple[InstanceRef, bytes | InstanceFailure]]:
        for ref in unit:
            try:
                yield ref, self.retrieve_instance(ref)
            except InstanceFailure as exc:
                yield ref, exc

    def retrieve_instance(self, ref: InstanceRef) -> bytes:
        """The instance's bytes as the PACS stores them, or ``InstanceFailure`` after the last
        retry (``PacsAuthError`` when the credentials are refused: that stops the run)."""
        for uid in (ref.study_uid, ref.series_uid, ref.sop_uid):
            if not _UID.match(uid):
                raise InstanceFailure(f"PACS {self.name!r}: {uid!r} is not a valid UID")
        url = (
            f"{self.entry.url}/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_uid}"
        )
        retries = self.entry.retries
        for attempt in range(retries + 1):
            try:
                return self._get_instance(url, ref)
            except _Transient as exc:
                if attempt == retries:
                    raise InstanceFailure(
                        f"PACS {self.name!r} did not deliver instance {ref.sop_uid} after "
                        f"{attempt + 1} attempt(s): {exc}",
                        transient=True,
                    ) from None
                self._pause(attempt, exc.retry_after)
        raise AssertionError("unreachable")

    def _get_instance(self, url: str, ref: InstanceRef) -> bytes:
        session = self._session()
        start = self._accept_start
        for index in range(start, len(ACCEPT_ORDER)):
            try:
                response = session.get(
                    url,
                    headers={"Accept": ACCEPT_ORDER[index]},
                    timeout=(min(10.0, self.entry.timeout), self.entry.timeout),
                    stream=True,
                )
            except requests.RequestException as exc:
                raise self._network(exc) from None
            with response:
                if response.status_code == 406:
                    continue
                if response.status_code == 404:
                    raise InstanceFailure(
                        f"PACS {self.name!r} has no instance {ref.sop_uid} (HTTP 404: deleted "
                        "since the query?)"
                    )
                self._check_status_instance(response, ref)
                body = self._read_body(response, ref)
                content_type = response.headers.get("Content-Type", "")
            data = extract_dicom(body, content_type, self.name, ref)
            if index != self._accept_start:
                self._accept_start = index
                log.info(
                    "PACS %r: WADO-RS refused transfer-syntax=*; using Accept option %d",
                    self.name,
                    index + 1,
                )
            return data
        raise InstanceFailure(
            f"PACS {self.name!r} refused every transfer syntax we accept for instance "
            f"{ref.sop_uid} (HTTP 406 to transfer-syntax=*, the lossless syntaxes and explicit "
            "VR little endian)"
        )

    def _check_status_instance(self, response: requests.Response, ref: InstanceRef) -> None:
        try:
            self._check_status(response, "the retrieval")
        except PacsProtocolError:
            raise InstanceFailure(
                f"PACS {self.name!r} answered HTTP {response.status_code} "
                f"{_reason_phrase(response)} for instance {ref.sop_uid}"
            ) from None

    def _read_body(self, response: requests.Response, ref: InstanceRef) -> bytes:
        chunks = []
        total = 0
        try:
            for chunk in response.iter_content(chunk_size=1024 * 1024):
                total += len(chunk)
                if total > MAX_INSTANCE_BYTES:
                    raise InstanceFailure(
                        f"PACS {self.name!r} sent more than {MAX_INSTANCE_BYTES:,} bytes for "
                        f"instance {ref.sop_uid}; refused"
                    )
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise _Transient(
                f"the answer was cut short ({network_reason(exc, self.entry.timeout)})"
            ) from None
        return b"".join(chunks)


# --- reading the answer ------------------------------------------------------------------------


def extract_dicom(body: bytes, content_type: str, pacs: str, ref: InstanceRef) -> bytes:
    """The one DICOM file in a WADO-RS answer; checks it is whole and is the instance asked for.

    A multipart body without its closing boundary was cut short (transient: retried); one
    with no DICOM part, several parts, or another instance is a failure.
    """
    media, params = _media_type(content_type)
    if media == "application/dicom":
        data = body
    elif media == "multipart/related":
        boundary = params.get("boundary")
        if not boundary:
            raise InstanceFailure(
                f"PACS {pacs!r} sent a multipart answer without a boundary for instance "
                f"{ref.sop_uid}"
            )
        parts = _multipart_parts(body, boundary.encode("latin-1"))
        if parts is None:
            raise _Transient("the multipart answer ended before its closing boundary (cut short)")
        if len(parts) != 1:
            raise InstanceFailure(
                f"PACS {pacs!r} sent {len(parts)} parts for instance {ref.sop_uid}, expected 1"
            )
        data = parts[0]
    else:
        raise InstanceFailure(
            f"PACS {pacs!r} answered with {media or 'no content type'!r} for instance "
            f"{ref.sop_uid}, not DICOM"
        )
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InstanceFailure(
            f"PACS {pacs!r} sent {len(data):,} bytes for instance {ref.sop_uid} that are not a "
            "DICOM file (no DICM prefix)"
        )
    got = sop_instance_uid_of(data)
    if got != ref.sop_uid:
        raise InstanceFailure(
            f"PACS {pacs!r} sent instance {got or '(no SOP Instance UID)'} when asked for "
            f"{ref.sop_uid}"
        )
    return data


def sop_instance_uid_of(data: bytes) -> str | None:
    """The SOP Instance UID in a DICOM file's bytes (header only), or None."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
        value = ds.get("SOPInstanceUID")
    except Exception:
        return None
    return str(value).strip("\x00 ") if value else None


def _multipart_parts(body: bytes, boundary: bytes) -> list[bytes] | None:
    """The parts' contents, or None when the closing delimiter is missing (cut short)."""
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0:
        return None
    parts = []
    position = start
    while True:
        after = position + len(delimiter)
        if body[after : after + 2] == b"--":
            return parts  # closing delimiter
        following = body.find(b"\r\n" + delimiter, after)
        if following < 0:
            return None
        part = body[after:following]
        if part.startswith(b"\r\n"):
            part = part[2:]
        header_end = part.find(b"\r\n\r\n")
        if header_end >= 0:
            content = part[header_end + 4 :]
        elif part.startswith(b"\r\n"):
            content = part[2:]
        else:
            content = b""
        if content:
            parts.append(content)
        position = following + 2


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    pieces = [p.strip() for p in content_type.split(";")]
    params = {}
    for piece in pieces[1:]:
        key, _, value = piece.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return pieces[0].lower(), params


# --- helpers -----------------------------------------------------------------------------------


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_Bearer(********)"


def _who(entry: PacsEntry) -> str:
    if entry.token is not None:
        return "our bearer token"
    if entry.username is not None:
        return f"the credentials of user {entry.username!r}"
    return "access without credentials"


def _reason_phrase(response: requests.Response) -> str:
    return (response.reason or "").strip()


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    return None


def _at_cap(count: int, entry: PacsEntry) -> bool:
    return entry.query_cap is not None and count >= entry.query_cap


def network_reason(exc: BaseException, timeout: float) -> str:
    """What went wrong on the network, in a few words (no URL, no credentials)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    text = ""
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verification failed ({e.verify_message or e.reason}); set "
                "ca_bundle to the CA that signed the PACS's certificate"
            )
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "host name not found"
        if isinstance(e, requests.Timeout | socket.timeout | TimeoutError):
            return f"no answer within {timeout:g} s"
        for nested in (e.__cause__, e.__context__, *getattr(e, "args", ())):
            if isinstance(nested, BaseException):
                todo.append(nested)
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        text = text or str(e)
    m = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    if m:
        return m.group(1).strip().rstrip(".").lower()
    if "Connection aborted" in text or "RemoteDisconnected" in text:
        return "the connection was closed by the PACS"
    if "IncompleteRead" in text or "Connection broken" in text:
        return "the connection broke during the answer"
    return type(exc).__name__


def _values(item: dict, keyword: str) -> list[str]:
    element = item.get(_TAGS[keyword])
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    if not isinstance(values, list):
        return []
    return [str(v).strip() for v in values if isinstance(v, str | int | float) and str(v).strip()]


def _text(item: dict, keyword: str) -> str | None:
    values = _values(item, keyword)
    return values[0] if values else None


def _int(item: dict, keyword: str) -> int | None:
    text = _text(item, keyword)
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None
