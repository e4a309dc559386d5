"""Where SRs go: a configured PACS, over DICOMweb (STOW-RS) or DIMSE (C-STORE).

A destination does two things for each study:

1. ``evidence(study_uid, sop_uids)``: the headers of the scored source images *as the PACS
   holds them* — patient and study attributes (so the SR files into the right study with the
   PACS's current demographics), Series Instance UID and SOP Class UID of each image. DICOMweb:
   QIDO-RS at study level (patient/study attributes) and one instance-level query per image;
   DIMSE: the same as C-FIND (Study Root). A study or an image the PACS does not hold raises
   ``NotInPacs`` (that study's publication fails with the reason; the batch goes on).
2. ``send(sr)``: store the SR, and answer a ``SendResult`` with the PACS's status and answer
   (no patient data in it).

STOW-RS is one ``POST {base}/studies/{study}`` with a ``multipart/related;
type="application/dicom"`` body whose length is known: ``requests`` sends it with a
``Content-Length`` header, never chunked (Orthanc answered 200 to a chunked STOW and stored
nothing: dicomweb-client#42). A 200 is believed only when the answer lists the SR in its
Referenced SOP Sequence. A refusal of the SOP class (STOW failure reason or DIMSE status 0x0122,
or a C-STORE association without a context for it) sets ``sop_class_refused``: the caller then
retries with Comprehensive SR.

Fatal problems (the PACS is unreachable, refuses our credentials or our AE title) raise
``tasks.dicom.pacs.common.PacsError`` subclasses with one line naming the PACS: nothing else in
the batch can succeed. The SR itself is held in memory only, never written to disk.
"""

from __future__ import annotations

import io
import logging
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.dicom.pacs.common import PacsAuthError, PacsError, PacsProtocolError, PacsUnreachable
from tasks.dicom.pacs.config import PacsEntry
from tasks.dicom.pacs.dicomweb import network_reason

log = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
REFUSED_SOP_CLASS = 0x0122
# Patient and study attributes the SR copies from the source study (Type 2 there).
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
IMAGE_KEYWORDS = ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")
_STOW_TAGS = {
    "failed": "00081198",
    "referenced": "00081199",
    "failure_reason": "00081197",
    "warning_reason": "00081196",
    "sop_instance": "00081155",
    "retrieve_url": "00081190",
}


class NotInPacs(Exception):
    """The PACS does not hold the study or one of its scored images (per-study failure)."""


@dataclass
class SendResult:
    """The PACS's answer to one SR. ``answer`` holds status codes, reasons and UIDs only."""

    ok: bool
    protocol: str  # "STOW-RS" or "C-STORE"
    pacs_status: str  # "HTTP 200", "0x0000", ...
    answer: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    sop_class_refused: bool = False


def make_destination(entry: PacsEntry, timeout: float | None = None):
    """The destination for a configured PACS entry."""
    if entry.kind == "dicomweb":
        return DicomWebDestination(entry, timeout=timeout)
    return DimseDestination(entry, timeout=timeout)


def _encode(sr: Dataset) -> bytes:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _utf8(ds: Dataset) -> Dataset:
    """Values read from JSON or a decoded C-FIND answer are Unicode: declare UTF-8."""
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


# --- DICOMweb ---------------------------------------------------------------------------------


class DicomWebDestination:
    """QIDO-RS for the evidence, STOW-RS for the SR."""

    protocol = "STOW-RS"

    def __init__(self, entry: PacsEntry, timeout: float | None = None) -> None:
        if entry.kind != "dicomweb" or not entry.url:
            raise ValueError(f"{entry.describe()} is not a DICOMweb PACS")
        self.entry = entry
        self.name = entry.name
        self.timeout = timeout or entry.timeout
        self.session = requests.Session()
        self.session.verify = entry.verify
        if entry.token is not None:
            token = entry.token.reveal()
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif entry.username is not None:
            password = entry.password.reveal() if entry.password else ""
            self.session.auth = (entry.username, password)
        self.session.headers["User-Agent"] = "cxr-screen"

    def describe(self) -> str:
        return self.entry.describe()

    def close(self) -> None:
        self.session.close()

    def _where(self) -> str:
        return f"PACS {self.name!r} ({self.entry.url})"

    def _request(self, method: str, path: str, what: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(
                method,
                f"{self.entry.url}{path}",
                timeout=(min(10.0, self.timeout), self.timeout),
                **kwargs,
            )
        except requests.RequestException as exc:
            raise PacsUnreachable(
                f"{self._where()} is unreachable: {network_reason(exc, self.timeout)}"
            ) from None
        if response.status_code in (401, 403):
            raise PacsAuthError(
                f"{self._where()} refused our credentials for {what}: HTTP "
                f"{response.status_code} (check the username and password or token)"
            )
        return response

    def _qido(self, path: str, params: dict[str, Any], what: str) -> list[dict]:
        response = self._request(
            "GET", path, what, params=params, headers={"Accept": "application/dicom+json"}
        )
        if response.status_code == 204 or (response.status_code == 200 and not response.content):
            return []
        if response.status_code != 200:
            raise PacsProtocolError(
                f"{self._where()} answered {what} with HTTP {response.status_code}"
            )
        try:
            answer = response.json()
        except ValueError:
            raise PacsProtocolError(
                f"{self._where()} answered {what} with malformed JSON"
            ) from None
        if not isinstance(answer, list):
            raise PacsProtocolError(f"{self._where()} answered {what} with JSON that is no list")
        return answer

    def evidence(self, study_uid: str, sop_uids: list[str]) -> list[Dataset]:
        studies = self._qido(
            "/studies",
            {"StudyInstanceUID": study_uid, "includefield": ",".join(STUDY_KEYWORDS)},
            "the study query",
        )
        if not studies:
            raise NotInPacs(f"PACS {self.name!r} does not hold study {study_uid}")
        study = Dataset.from_json(studies[0])
        out = []
        for sop_uid in sop_uids:
            found = self._qido(
                f"/studies/{study_uid}/instances",
                {"SOPInstanceUID": sop_uid, "includefield": ",".join(IMAGE_KEYWORDS)},
                "the instance query",
            )
            if not found:
                raise NotInPacs(
                    f"PACS {self.name!r} does not hold image {sop_uid} of study {study_uid}"
                )
            image = Dataset.from_json(found[0])
            out.append(_utf8(_merge(study, image, study_uid)))
        return out

    def send(self, sr: Dataset) -> SendResult:
        data = _encode(sr)
        boundary = uuid.uuid4().hex
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
        # bytes, not a generator: requests sets Content-Length and never chunks the body
        response = self._request(
            "POST",
            f"/studies/{sr.StudyInstanceUID}",
            "the STOW-RS request",
            data=body,
            headers={
                "Content-Type": (
                    f'multipart/related; type="application/dicom"; boundary={boundary}'
                ),
                "Accept": "application/dicom+json",
            },
        )
        return self._stow_result(response, str(sr.SOPInstanceUID))

    def _stow_result(self, response: requests.Response, sop_uid: str) -> SendResult:
        status = f"HTTP {response.status_code}"
        answer: dict[str, Any] = {"http_status": response.status_code}
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        if isinstance(body, list):  # some servers wrap the answer in a list
            body = body[0] if body else {}
        referenced = [
            _value(item, _STOW_TAGS["sop_instance"])
            for item in _seq(body, _STOW_TAGS["referenced"])
        ]
        failed = [
            {
                "sop_instance_uid": _value(item, _STOW_TAGS["sop_instance"]),
                "failure_reason": _value(item, _STOW_TAGS["failure_reason"]),
            }
            for item in _seq(body, _STOW_TAGS["failed"])
        ]
        warnings = [
            _value(item, _STOW_TAGS["warning_reason"])
            for item in _seq(body, _STOW_TAGS["referenced"])
            if _value(item, _STOW_TAGS["warning_reason"]) is not None
        ]
        answer.update(referenced=referenced, failed=failed)
        if warnings:
            answer["warnings"] = warnings
        if response.headers.get("Warning"):
            answer["warning_header"] = response.headers["Warning"][:300]
        refused = any(f["failure_reason"] == REFUSED_SOP_CLASS for f in failed)
        if response.status_code == 200 and sop_uid in referenced and not failed:
            return SendResult(True, "STOW-RS", status, answer)
        if response.status_code == 200 and not failed:
            error = (
                f"PACS {self.name!r} answered the STOW-RS with HTTP 200 but did not list the SR "
                "as stored"
            )
        elif failed:
            reason = failed[0]["failure_reason"]
            error = (
                f"PACS {self.name!r} refused the SR: STOW-RS failure reason "
                f"{_hex(reason)} ({status})"
            )
        else:
            error = f"PACS {self.name!r} answered the STOW-RS with {status}"
        if response.status_code == 415:
            refused = True  # unsupported media type: the SR's class, for some servers
        return SendResult(False, "STOW-RS", status, answer, error, refused)


def _merge(study: Dataset, image: Dataset, study_uid: str) -> Dataset:
    ds = Dataset()
    for keyword in STUDY_KEYWORDS:
        if keyword in study:
            setattr(ds, keyword, study.data_element(keyword).value)
    for keyword in IMAGE_KEYWORDS:
        if keyword in image:
            setattr(ds, keyword, image.data_element(keyword).value)
    ds.StudyInstanceUID = study_uid
    return ds


def _seq(body: Any, tag: str) -> list[dict]:
    if not isinstance(body, dict):
        return []
    element = body.get(tag) or {}
    value = element.get("Value") if isinstance(element, dict) else None
    return [v for v in value or [] if isinstance(v, dict)]


def _value(item: dict, tag: str) -> Any:
    element = item.get(tag) or {}
    value = element.get("Value") if isinstance(element, dict) else None
    return value[0] if value else None


def _hex(value: Any) -> str:
    return f"0x{value:04X}" if isinstance(value, int) else str(value)


# --- DIMSE ------------------------------------------------------------------------------------


class DimseDestination:
    """C-FIND (Study Root) for the evidence, C-STORE for the SR."""

    protocol = "C-STORE"

    def __init__(self, entry: PacsEntry, timeout: float | None = None) -> None:
        if entry.kind != "dimse" or not (entry.aet and entry.host and entry.port):
            raise ValueError(f"{entry.describe()} is not a DIMSE PACS")
        self.entry = entry
        self.name = entry.name
        self.timeout = timeout or entry.timeout
        logger = logging.getLogger("pynetdicom")
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.CRITICAL)

    def describe(self) -> str:
        return self.entry.describe()

    def close(self) -> None:
        pass

    def _where(self) -> str:
        return f"PACS {self.name!r} (DIMSE {self.entry.aet}@{self.entry.host}:{self.entry.port})"

    def _associate(self, contexts: list[tuple[str, list[str]]], what: str):
        from pynetdicom import AE

        ae = AE(ae_title=self.entry.calling_aet)
        ae.acse_timeout = min(30.0, self.timeout)
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = min(10.0, self.timeout)
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        kwargs: dict[str, Any] = {"ae_title": self.entry.aet}
        if self.entry.tls:
            context = ssl.create_default_context(cafile=self.entry.ca_bundle)
            if not self.entry.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            kwargs["tls_args"] = (context, self.entry.host)
        assoc = ae.associate(self.entry.host, self.entry.port, **kwargs)
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            reason = getattr(assoc.acceptor.primitive, "reason_str", "no reason given")
            raise PacsAuthError(
                f"{self._where()} rejected the association from {self.entry.calling_aet!r} "
                f"for {what}: {reason} (is our AE title configured in the PACS?)"
            )
        raise PacsUnreachable(f"{self._where()} is unreachable (no association for {what})")

    def _find(self, assoc, identifier: Dataset, what: str) -> list[Dataset]:
        matches = []
        for status, found in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsUnreachable(f"{self._where()} did not answer {what} (timed out)")
            if code in (0xFF00, 0xFF01) and found is not None:
                matches.append(found)
            elif code != 0x0000:
                raise PacsProtocolError(f"{self._where()} answered {what} with status {_hex(code)}")
        return matches

    def evidence(self, study_uid: str, sop_uids: list[str]) -> list[Dataset]:
        assoc = self._associate(
            [(STUDY_ROOT_FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])], "C-FIND"
        )
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            for keyword in STUDY_KEYWORDS:
                setattr(query, keyword, "")
            query.StudyInstanceUID = study_uid
            studies = self._find(assoc, query, "the study C-FIND")
            if not studies:
                raise NotInPacs(f"PACS {self.name!r} does not hold study {study_uid}")
            out = []
            for sop_uid in sop_uids:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID = study_uid
                query.SeriesInstanceUID = ""
                query.SOPInstanceUID = sop_uid
                query.SOPClassUID = ""
                found = self._find(assoc, query, "the image C-FIND")
                if not found:
                    raise NotInPacs(
                        f"PACS {self.name!r} does not hold image {sop_uid} of study {study_uid}"
                    )
                out.append(_utf8(_merge(studies[0], found[0], study_uid)))
            return out
        finally:
            assoc.release()

    def send(self, sr: Dataset) -> SendResult:
        sop_class = str(sr.SOPClassUID)
        assoc = self._associate(
            [(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])], "C-STORE"
        )
        try:
            if not any(
                cx.abstract_syntax == sop_class and cx.result == 0 for cx in assoc.accepted_contexts
            ):
                return SendResult(
                    False,
                    "C-STORE",
                    "context rejected",
                    {"sop_class_uid": sop_class},
                    f"PACS {self.name!r} does not accept SR class {sop_class}",
                    sop_class_refused=True,
                )
            status = assoc.send_c_store(sr)
        finally:
            if assoc.is_established:
                assoc.release()
        code = getattr(status, "Status", None)
        if code is None:
            return SendResult(
                False,
                "C-STORE",
                "no answer",
                {},
                f"PACS {self.name!r} did not answer the C-STORE within {self.timeout:g} s",
            )
        answer: dict[str, Any] = {"status": _hex(code)}
        if "ErrorComment" in status:
            answer["error_comment"] = str(status.ErrorComment)[:200]
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:  # success, or a warning: stored
            return SendResult(True, "C-STORE", _hex(code), answer)
        return SendResult(
            False,
            "C-STORE",
            _hex(code),
            answer,
            f"PACS {self.name!r} refused the SR: C-STORE status {_hex(code)}",
            sop_class_refused=code == REFUSED_SOP_CLASS,
        )


__all__ = [
    "DicomWebDestination",
    "DimseDestination",
    "NotInPacs",
    "PacsError",
    "SendResult",
    "make_destination",
]
