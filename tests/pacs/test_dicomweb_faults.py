"""DICOMweb faults Orthanc cannot produce, from a real HTTP server (pytest-httpserver) that
behaves like the servers met in the field: 406 without ``transfer-syntax=*``, ``offset``
ignored, capped pages with a ``Warning`` header, 503 then success, bodies cut short,
malformed JSON, 401, timeouts. The client is never patched."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import pytest
from pacs_support import synth_file
from werkzeug import Request, Response

from tasks.dicom.outcomes import InputError
from tasks.dicom.pacs.common import (
    PacsAuthError,
    PacsProtocolError,
    StudyWindow,
    parse_source_uri,
)
from tasks.dicom.pacs.config import build_entry
from tasks.dicom.pacs.dicomweb import DicomWebClient
from tasks.dicom.pacs.source import PacsRetrieval, RetrievalReport, find_studies

PASSWORD = "fake-server-password-9"
BOUNDARY = "cxr-test-boundary"


@dataclass
class Study:
    uid: str
    date: str
    series_uid: str
    instances: dict[str, bytes]  # SOP Instance UID -> file bytes


@dataclass
class FakePacs:
    """A DICOMweb server with switchable misbehaviour. Counts the requests it answers."""

    studies: list[Study] = field(default_factory=list)
    ignore_offset: bool = False
    cap: int | None = None  # at most this many matches per answer, with a Warning header
    refuse_star: bool = False  # 406 to transfer-syntax=*
    refuse_all: bool = False  # 406 to every Accept
    failures: dict[str, list] = field(default_factory=dict)  # SOP UID -> planned answers
    qido_body: bytes | None = None  # sent instead of the QIDO answer
    bare_dicom: bool = False  # answer application/dicom instead of multipart
    wrong_instance: bool = False
    delay: float = 0.0
    accepts: list[str] = field(default_factory=list)
    qido_queries: list[dict] = field(default_factory=list)

    def handle(self, request: Request) -> Response:
        if request.authorization is None or request.authorization.password != PASSWORD:
            return Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})
        if self.delay:
            time.sleep(self.delay)
        path = request.path.removeprefix("/dicom-web")
        m = re.fullmatch(r"/studies/([\d.]+)/series/([\d.]+)/instances/([\d.]+)", path)
        if m:
            return self.wado(request, m.group(3))
        return self.qido(request, path)

    def qido(self, request: Request, path: str) -> Response:
        self.qido_queries.append({"path": path, **request.args.to_dict()})
        if self.qido_body is not None:
            return Response(self.qido_body, content_type="application/dicom+json")
        limit = int(request.args.get("limit", 1000))
        offset = 0 if self.ignore_offset else int(request.args.get("offset", 0))
        if path == "/studies":
            rows = [_study_json(s) for s in self.studies if _date_matches(s.date, request)]
        elif m := re.fullmatch(r"/studies/([\d.]+)/series", path):
            rows = [_series_json(s) for s in self.studies if s.uid == m.group(1)]
        elif m := re.fullmatch(r"/studies/([\d.]+)/series/([\d.]+)/instances", path):
            study = next(s for s in self.studies if s.uid == m.group(1))
            rows = [_instance_json(uid) for uid in study.instances]
        else:
            return Response(status=404)
        page = rows[offset : offset + limit]
        headers = {}
        if self.cap is not None and len(page) > self.cap:
            page = page[: self.cap]
            headers["Warning"] = '299 fake: "There are additional results that can be requested"'
        return Response(json.dumps(page), content_type="application/dicom+json", headers=headers)

    def wado(self, request: Request, sop_uid: str) -> Response:
        accept = request.headers.get("Accept", "")
        self.accepts.append(accept)
        planned = self.failures.get(sop_uid)
        if planned:
            answer = planned.pop(0)
            if isinstance(answer, int):
                return Response(status=answer, headers={"Retry-After": "0"})
            return answer
        if self.refuse_all or (self.refuse_star and "transfer-syntax=*" in accept):
            return Response(status=406)
        data = next(s.instances[sop_uid] for s in self.studies if sop_uid in s.instances)
        if self.wrong_instance:
            data = next(d for s in self.studies for u, d in s.instances.items() if u != sop_uid)
        if self.bare_dicom:
            return Response(data, content_type="application/dicom")
        return multipart(data)


def multipart(data: bytes, closing: bool = True) -> Response:
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + (f"\r\n--{BOUNDARY}--\r\n".encode() if closing else b"")
    )
    return Response(
        body, content_type=f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    )


def truncated(data: bytes) -> Response:
    """Content-Length says more than is sent: the connection ends inside the body."""
    body = multipart(data).get_data()[: len(data) // 2]
    response = Response(iter([body]), content_type=f"multipart/related; boundary={BOUNDARY}")
    response.headers["Content-Length"] = str(len(data) + 200)
    return response


def _date_matches(date: str, request: Request) -> bool:
    wanted = request.args.get("StudyDate")
    if not wanted:
        return True
    first, _, last = wanted.partition("-")
    return first <= date <= (last or first)


def _study_json(s: Study) -> dict:
    return {
        "0020000D": {"vr": "UI", "Value": [s.uid]},
        "00080020": {"vr": "DA", "Value": [s.date]},
        "00080061": {"vr": "CS", "Value": ["CR"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
        "00201208": {"vr": "IS", "Value": [len(s.instances)]},
    }


def _series_json(s: Study) -> dict:
    return {
        "0020000E": {"vr": "UI", "Value": [s.series_uid]},
        "00080060": {"vr": "CS", "Value": ["CR"]},
        "00201209": {"vr": "IS", "Value": [len(s.instances)]},
    }


def _instance_json(uid: str) -> dict:
    return {"00080018": {"vr": "UI", "Value": [uid]}}


@pytest.fixture
def fake(httpserver, tmp_path) -> FakePacs:
    server = FakePacs()
    httpserver.expect_request(re.compile(r"/dicom-web/.*")).respond_with_handler(server.handle)
    server.url = httpserver.url_for("/dicom-web")
    server.tmp = tmp_path
    return server


def add_studies(fake: FakePacs, dates: list[str], per_study: int = 1) -> list[Study]:
    added = []
    for date in dates:
        n = len(fake.studies)
        files = [
            synth_file(fake.tmp, study=n, instance=i, study_date=date, size=48)
            for i in range(per_study)
        ]
        study = Study(
            files[0].study_uid,
            date,
            files[0].series_uid,
            {f.sop_uid: f.path.read_bytes() for f in files},
        )
        fake.studies.append(study)
        added.append(study)
    return added


def client(fake: FakePacs, **fields) -> DicomWebClient:
    values = {"url": fake.url, "username": "u", "password": PASSWORD, "retries": 2, **fields}
    return DicomWebClient(build_entry("fake", values, "CXRSCREEN", "test"), backoff=0.01)


def run(fake: FakePacs, window: str = "2026-11-01..2026-11-30", **fields) -> tuple:
    retrieval = PacsRetrieval(client(fake, **fields), window=StudyWindow.parse(window))
    with retrieval:
        retrieval.prepare()  # as a flow does before it writes anything
        files = list(retrieval.files())
    return retrieval, {parse_source_uri(f.uri)[2].sop_uid: f for f in files}


def test_406_to_transfer_syntax_star_falls_back_and_remembers(fake):
    fake.refuse_star = True
    studies = add_studies(fake, ["20261128"] * 3)
    _, files = run(fake, connections=1)
    assert all(files[uid].data == s.instances[uid] for s in studies for uid in s.instances)
    assert fake.accepts[0].endswith("transfer-syntax=*")
    assert "transfer-syntax=1.2.840.10008.1.2.4.90" in fake.accepts[1]  # the lossless list
    assert len(fake.accepts) == 4  # 406 once, then the list straight away for every instance
    assert not any("transfer-syntax=*" in a for a in fake.accepts[1:])


def test_406_to_every_syntax_fails_the_instance_with_its_uid(fake):
    fake.refuse_all = True
    (study,) = add_studies(fake, ["20261128"])
    retrieval, files = run(fake)
    (uid,) = study.instances
    assert files[uid].error.startswith(
        f"PACS 'fake' refused every transfer syntax we accept for instance {uid} (HTTP 406"
    )
    assert len(fake.accepts) == 4
    assert retrieval.partial_studies()[0].study_uid == study.uid


def test_server_ignoring_offset_stops_and_the_window_is_split(fake):
    fake.ignore_offset = True
    dates = [f"202611{d:02d}" for d in (3, 3, 9, 9, 9, 9, 9, 17, 25, 25)]
    studies = add_studies(fake, dates)
    report = RetrievalReport("fake")
    found = find_studies(
        client(fake, page_size=3), StudyWindow.parse("2026-11-01..2026-11-30"), ["CR"], report
    )
    assert sorted(s.study_uid for s in found) == sorted(s.uid for s in studies)
    assert not report.truncated


def test_server_ignoring_offset_on_a_full_day_ends_the_paging(fake):
    fake.ignore_offset = True
    add_studies(fake, ["20261128"] * 25)
    report = RetrievalReport("fake")
    found = find_studies(client(fake, page_size=2), StudyWindow.parse("2026-11-28"), ["CR"], report)
    # limit 2, then a 10x page (20) that is full; the next offset brings the same 20: stop.
    assert len(found) == 20 and report.queries == 3 and len(fake.qido_queries) == 3
    assert report.truncated == ["2026-11-28 (CR: 20 studies received)"]


def test_capped_pages_with_a_warning_header_split_the_window(fake):
    fake.cap = 4  # whatever the limit, at most 4 per answer, said with a Warning header
    dates = [f"202611{d:02d}" for d in range(1, 13)]
    studies = add_studies(fake, dates)
    report = RetrievalReport("fake")
    found = find_studies(
        client(fake, page_size=100), StudyWindow.parse("2026-11-01..2026-11-30"), ["CR"], report
    )
    assert sorted(s.study_uid for s in found) == sorted(s.uid for s in studies)
    assert not report.truncated
    assert all(int(q["limit"]) == 100 for q in fake.qido_queries if "offset" in q)


def test_503_then_success_is_retried(fake):
    (study,) = add_studies(fake, ["20261128"])
    (uid,) = study.instances
    fake.failures[uid] = [503, 503]
    retrieval, files = run(fake)
    assert files[uid].error is None and files[uid].data == study.instances[uid]
    assert len(fake.accepts) == 3
    assert retrieval.completeness[study.uid].complete


def test_503_forever_fails_the_instance_after_the_last_retry(fake):
    (study,) = add_studies(fake, ["20261128"])
    (uid,) = study.instances
    fake.failures[uid] = [503] * 10
    retrieval, files = run(fake)
    assert files[uid].error == (
        f"PACS 'fake' did not deliver instance {uid} after 3 attempt(s): "
        "HTTP 503 SERVICE UNAVAILABLE"
    )
    assert len(fake.accepts) == 3 and not retrieval.completeness[study.uid].complete


def test_multipart_body_without_its_closing_boundary_is_retried_then_failed(fake):
    studies = add_studies(fake, ["20261128", "20261128"])
    (once,), (always,) = (s.instances for s in studies)
    fake.failures[once] = [multipart(studies[0].instances[once], closing=False)]
    fake.failures[always] = [multipart(studies[1].instances[always], closing=False)] * 3
    _, files = run(fake)
    assert files[once].error is None and files[once].data == studies[0].instances[once]
    assert "cut short" in files[always].error and always in files[always].error
    with pytest.raises(InputError, match="cut short"):  # a truncated file never reaches
        files[always].read_bytes()  # the decoder: its entry only carries the reason


def test_connection_ending_inside_the_body_is_retried(fake):
    (study,) = add_studies(fake, ["20261128"])
    (uid,) = study.instances
    fake.failures[uid] = [truncated(study.instances[uid])]
    _, files = run(fake)
    assert files[uid].error is None and files[uid].data == study.instances[uid]
    assert len(fake.accepts) == 2


def test_bare_application_dicom_answer_is_accepted(fake):
    fake.bare_dicom = True
    (study,) = add_studies(fake, ["20261128"])
    (uid,) = study.instances
    _, files = run(fake)
    assert files[uid].data == study.instances[uid]


def test_another_instance_than_asked_is_refused(fake):
    fake.wrong_instance = True
    studies = add_studies(fake, ["20261128", "20261128"])
    _, files = run(fake)
    uid = next(iter(studies[0].instances))
    assert re.fullmatch(rf"PACS 'fake' sent instance [\d.]+ when asked for {uid}", files[uid].error)


def test_malformed_qido_json_is_one_line_without_the_body(fake):
    add_studies(fake, ["20261128"])
    fake.qido_body = b'[{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}'
    with pytest.raises(PacsProtocolError) as info:
        run(fake)
    message = str(info.value)
    assert message == (
        f"PACS 'fake' (DICOMweb {fake.url}) answered the study query with malformed JSON "
        "(not DICOM JSON)"
    )
    fake.qido_body = b'{"not": "a list"}'
    with pytest.raises(PacsProtocolError, match="not a list of DICOM objects|without a valid"):
        run(fake)


def test_wrong_credentials_are_one_line_without_the_password(fake):
    add_studies(fake, ["20261128"])
    wrong = "this-is-wrong-123"
    with pytest.raises(PacsAuthError) as info:
        run(fake, password=wrong)
    message = str(info.value)
    assert "HTTP 401" in message and "user 'u'" in message
    assert wrong not in message and PASSWORD not in message and "\n" not in message


def test_timeouts_are_retried_then_the_instance_fails(fake):
    (study,) = add_studies(fake, ["20261128"])
    (uid,) = study.instances
    qido = client(fake, timeout=2)
    series = qido.find_series(study.uid)[0]
    (ref,) = qido.find_instances(series)
    fake.delay = 0.6
    slow = client(fake, timeout=0.2, retries=1)
    from tasks.dicom.pacs.common import InstanceFailure

    started = time.perf_counter()
    with pytest.raises(InstanceFailure) as info:
        slow.retrieve_instance(ref)
    assert str(info.value) == (
        f"PACS 'fake' did not deliver instance {uid} after 2 attempt(s): no answer within 0.2 s"
    )
    assert time.perf_counter() - started < 5
