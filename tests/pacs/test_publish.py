"""Results back to the PACS: the SR (dciodvfy), STOW-RS and C-STORE to the real Orthanc, the
publications table and v_unpublished, the Comprehensive SR fallback and the STOW's
Content-Length (a small real HTTP server), failures and the command line.

Study results come from real screening runs (`cxr-screen screen`, two model versions) of
generated radiographs, once per module; each test works on a copy of that database.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
import sqlalchemy as sa
from pacs_support import dicomweb_entry, dimse_entry, synth_file
from support import make_model

from sql.db import connect, session_factory
from sql.publications import find_models, publications
from tasks.dicom.pacs.common import PacsAuthError, PacsUnreachable
from tasks.publish import sr as srmod
from tasks.publish.destinations import DicomWebDestination, DimseDestination
from tasks.publish.publish import publish_results

CXR_SCREEN = str(Path(sys.executable).parent / "cxr-screen")
REPO = Path(__file__).resolve().parents[2]


# --- the SR itself ------------------------------------------------------------------------------


def _study(tmp_path, n=2):
    files = [synth_file(tmp_path, study=5, instance=i, seed=41) for i in range(n)]
    evidence = [pydicom.dcmread(f.path, stop_before_pixels=True) for f in files]
    images = tuple(
        srmod.ImageResult(f.sop_uid, f.series_uid, score, score >= 0.42)
        for f, score in zip(files, (0.8125, 0.25), strict=False)
    )
    result = srmod.StudyResult(files[0].study_uid, 0.8125, True, 0.42, "max", images)
    model = srmod.ModelIdentity("pub", "a-1", "ab" * 32, 0.42, "abnormal", "cd" * 32)
    return files, evidence, result, model


def text_values(ds) -> list[str]:
    """Every TEXT content item's value in the SR tree (algorithm name, version, parameters)."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out += text_values(item)
    return out


def dciodvfy(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is missing: apt-get install dicom3tools", pytrace=False)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


@pytest.mark.parametrize("sop_class", [srmod.COMPREHENSIVE_3D_SR, srmod.COMPREHENSIVE_SR])
def test_the_sr_passes_dciodvfy_and_carries_the_result(tmp_path, sop_class):
    files, evidence, result, model = _study(tmp_path)
    sr = srmod.build_sr(result, model, evidence, sop_class_uid=sop_class)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = dciodvfy(path)
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report
    # the only warnings: our private coding scheme is not a defined term of the standard
    warnings = [line for line in report.splitlines() if line.startswith("Warning")]
    assert all("99CXRSCREEN" in w for w in warnings), warnings

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == sop_class and ds.Modality == "SR"
    assert ds.StudyInstanceUID == files[0].study_uid  # in the source study ...
    assert ds.SeriesInstanceUID not in {f.series_uid for f in files}  # ... in a new series
    assert ds.PatientID == evidence[0].PatientID and ds.PatientName == evidence[0].PatientName
    assert ds.AccessionNumber == evidence[0].AccessionNumber
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {f.sop_uid for f in files}

    # read back with highdicom: one group for the study, one per image
    report = srmod.SR_CLASSES[sop_class].from_dataset(ds).content
    groups = report.get_image_measurement_groups()
    assert len(groups) == 1 + len(files)
    found = []
    for group in groups:
        (measurement,) = group.get_measurements()
        (evaluation,) = group.get_qualitative_evaluations()
        assert measurement.name.meaning == "Probability" and measurement.unit.value == "1"
        assert evaluation.name.meaning == "abnormal (model class)"
        found.append(
            (
                float(measurement.value),
                evaluation.value.meaning,
                sorted(i.referenced_sop_instance_uid for i in group.source_images),
            )
        )
    uids = sorted(f.sop_uid for f in files)
    assert found == [
        (0.8125, "Positive", uids),
        (0.8125, "Positive", [files[0].sop_uid]),
        (0.25, "Negative", [files[1].sop_uid]),
    ]
    texts = set(text_values(ds))
    assert {"pub", "a-1", f"checkpoint sha256 {'ab' * 32}", "threshold 0.42"} <= texts
    assert {"study aggregation max", f"preprocessing sha256 {'cd' * 32}"} <= texts
    procedure = [
        item.ConceptCodeSequence[0]
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Procedure reported"
    ]
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in procedure] == [("399208008", "SCT")]


def test_sr_uids_are_derived_from_study_and_model_version(tmp_path):
    files, evidence, result, model = _study(tmp_path, n=1)
    one = srmod.build_sr(result, model, evidence)
    again = srmod.build_sr(result, model, evidence)
    assert (one.SeriesInstanceUID, one.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    other = srmod.ModelIdentity("pub", "b-1", "ef" * 32, 0.5, "abnormal")
    second = srmod.build_sr(result, other, evidence)
    assert second.SeriesInstanceUID != one.SeriesInstanceUID
    assert second.SOPInstanceUID != one.SOPInstanceUID
    for uid in (one.SOPInstanceUID, one.SeriesInstanceUID, second.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    identity = srmod.sr_identity(files[0].study_uid, model)
    assert identity.sop_instance_uid == one.SOPInstanceUID


def test_the_sr_refuses_what_it_cannot_reference(tmp_path):
    files, evidence, result, model = _study(tmp_path)
    with pytest.raises(srmod.SRBuildError, match="not in the evidence"):
        srmod.build_sr(result, model, evidence[:1])
    with pytest.raises(srmod.SRBuildError, match="no scored image"):
        srmod.build_sr(
            srmod.StudyResult(result.study_instance_uid, 0.5, True, 0.42, "max", ()),
            model,
            evidence,
        )
    with pytest.raises(srmod.SRBuildError, match="not supported"):
        srmod.build_sr(result, model, evidence, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11")
    moved = [pydicom.dcmread(f.path, stop_before_pixels=True) for f in files]
    moved[0].StudyInstanceUID = "1.2.3.4"
    with pytest.raises(srmod.SRBuildError, match="belongs to study 1.2.3.4"):
        srmod.build_sr(result, model, moved)


# --- study results from real screening runs -----------------------------------------------------


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    return subprocess.run(
        [CXR_SCREEN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or REPO,
        timeout=timeout,
    )


def screen(folder: Path, model: Path, url: str, home: Path, api_url: str) -> dict:
    """A real `cxr-screen screen` run, reporting to the session's Prefect server."""
    done = cli(
        "screen", str(folder), "--model", str(model), "--db", url, "--workers", "0",
        "--device", "cpu", "--json",
        env={"CXR_SCREEN_HOME": str(home), "PREFECT_API_URL": api_url},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class Corpus:
    def __init__(self, root: Path):
        self.root = root
        self.folder = root / "studies"
        # study 1: two images in one series; studies 2 and 3: one image each (CR, DX)
        self.files = [
            synth_file(self.folder, study=1, instance=0),
            synth_file(self.folder, study=1, instance=1),
            synth_file(self.folder, study=2),
            synth_file(self.folder, study=3, modality="DX"),
        ]
        self.studies = sorted({f.study_uid for f in self.files})
        self.model_a = make_model(root / "a.pt", "a-1", 0, name="pub")
        self.model_b = make_model(root / "b.pt", "b-1", 1, name="pub")
        self.template = root / "template.db"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, prefect_api_url) -> Corpus:
    c = Corpus(tmp_path_factory.mktemp("publish"))
    url = f"sqlite:///{c.template}"
    for model in (c.model_a, c.model_b):
        summary = screen(c.folder, model, url, c.root / "home", prefect_api_url)
        assert summary["predicted"] == len(c.files)
    return c


@pytest.fixture
def results(corpus, tmp_path) -> str:
    """A copy of the screened database for one test."""
    path = tmp_path / "results.db"
    shutil.copy(corpus.template, path)
    return f"sqlite:///{path}"


def model_id(url: str, version: str) -> int:
    with session_factory(connect(url)).begin() as session:
        (found,) = find_models(session, name="pub", version=version)
    return found


def unpublished(url: str) -> list[dict]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM v_unpublished"))]
    engine.dispose()
    return rows


def sr_series(pacs, study_uid: str) -> list[dict]:
    r = requests.get(
        f"{pacs.dicomweb_url}/studies/{study_uid}/series",
        params={"Modality": "SR"},
        auth=pacs.auth,
        timeout=30,
    )
    assert r.status_code in (200, 204)
    return r.json() if r.content else []


def instances_in(pacs, study_uid: str) -> list[dict]:
    r = requests.get(
        f"{pacs.dicomweb_url}/studies/{study_uid}/instances", auth=pacs.auth, timeout=30
    )
    assert r.status_code == 200
    return r.json()


def test_stow_then_qido_finds_the_sr_republish_adds_nothing_second_version_adds_its_own(
    pacs, corpus, results, tmp_path
):
    pacs.upload_files(f.path for f in corpus.files)
    before = pacs.count_instances()
    sessions = session_factory(connect(results))
    a, b = model_id(results, "a-1"), model_id(results, "b-1")
    assert len(unpublished(results)) == 2 * len(corpus.studies)

    destination = DicomWebDestination(dicomweb_entry(pacs))
    first = publish_results(sessions, destination, model_ids=[a])
    assert (first.considered, first.sent, first.failed) == (3, 3, 0)
    assert pacs.count_instances() == before + 3

    model_a = srmod.ModelIdentity("pub", "a-1", "x", 0.5, "abnormal")
    for study_uid in corpus.studies:
        found = sr_series(pacs, study_uid)  # QIDO finds it in the source study
        identity = srmod.sr_identity(study_uid, model_a)
        assert [s["0020000E"]["Value"][0] for s in found] == [identity.series_instance_uid]
        stored = pacs.instance_bytes(identity.sop_instance_uid)
        ds = pydicom.dcmread(io.BytesIO(stored))
        assert ds.SOPClassUID == srmod.COMPREHENSIVE_3D_SR and ds.StudyInstanceUID == study_uid
        path = tmp_path / "stored.dcm"
        path.write_bytes(stored)
        assert not [x for x in dciodvfy(path).splitlines() if x.startswith("Error")]

    with sessions.begin() as session:
        rows = publications(session, model_id=a)
    assert [r["status"] for r in rows] == ["sent"] * 3
    assert {r["pacs_status"] for r in rows} == {"HTTP 200"}
    assert all(r["sr_sop_instance_uid"] in r["pacs_answer"]["referenced"] for r in rows)
    assert all(r["destination"].startswith("test (DICOMweb http://127.0.0.1:") for r in rows)
    assert not any(pacs.password in json.dumps(r, default=str) for r in rows)
    assert {r["model_id"] for r in unpublished(results)} == {b}

    again = publish_results(sessions, destination, model_ids=[a])
    assert again.considered == 0  # nothing unpublished
    forced = publish_results(sessions, destination, model_ids=[a], unpublished_only=False)
    assert (forced.sent, forced.failed) == (3, 0)
    assert pacs.count_instances() == before + 3  # same UIDs: replaced, not added

    second = publish_results(sessions, destination, model_ids=[b])
    assert (second.sent, second.failed) == (3, 0)
    assert pacs.count_instances() == before + 6
    for study_uid in corpus.studies:
        assert len(sr_series(pacs, study_uid)) == 2  # one series per model version
        n_images = sum(1 for f in corpus.files if f.study_uid == study_uid)
        assert len(instances_in(pacs, study_uid)) == n_images + 2
    assert unpublished(results) == []
    destination.close()


def test_a_study_the_pacs_does_not_hold_fails_alone_and_stays_unpublished(pacs, corpus, results):
    held = corpus.files[0].study_uid
    pacs.upload_files(f.path for f in corpus.files if f.study_uid == held)
    a = model_id(results, "a-1")
    summary = publish_results(
        session_factory(connect(results)), DicomWebDestination(dicomweb_entry(pacs)), model_ids=[a]
    )
    assert (summary.sent, summary.failed) == (1, 2)
    assert summary.as_dict()["top_reasons"] == [
        {"studies": 2, "reason": "PACS 'test' does not hold study <uid>"}
    ]
    left = {r["study_instance_uid"]: r for r in unpublished(results) if r["model_id"] == a}
    assert set(left) == set(corpus.studies) - {held}
    assert all(r["last_status"] == "failed" for r in left.values())
    assert all("does not hold study" in r["last_error"] for r in left.values())
    assert pacs.count_instances() == 2 + 1  # the two images of the held study and its SR


def test_c_store_to_orthanc_over_dimse(pacs, corpus, results, move_port):
    pacs.upload_files(f.path for f in corpus.files)
    a = model_id(results, "a-1")
    destination = DimseDestination(dimse_entry(pacs, move_port))
    summary = publish_results(session_factory(connect(results)), destination, model_ids=[a])
    assert (summary.sent, summary.failed) == (3, 0)
    with session_factory(connect(results)).begin() as session:
        rows = publications(session, model_id=a)
    assert {(r["protocol"], r["pacs_status"]) for r in rows} == {("C-STORE", "0x0000")}
    for study_uid in corpus.studies:
        assert len(sr_series(pacs, study_uid)) == 1


def test_unreachable_and_wrong_credentials_stop_the_batch_with_one_line(pacs, corpus, results):
    from orthanc import free_port

    pacs.upload_files(f.path for f in corpus.files)
    sessions = session_factory(connect(results))
    a = model_id(results, "a-1")
    gone = dicomweb_entry(pacs, url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(PacsUnreachable) as info:
        publish_results(sessions, DicomWebDestination(gone), model_ids=[a])
    assert "connection refused" in str(info.value) and "\n" not in str(info.value)
    wrong = dicomweb_entry(pacs, password="not-the-password-42")
    with pytest.raises(PacsAuthError) as info:
        publish_results(sessions, DicomWebDestination(wrong), model_ids=[a])
    assert "401" in str(info.value) and "not-the-password-42" not in str(info.value)
    with sessions.begin() as session:
        rows = publications(session, model_id=a)
    # one attempt recorded each time (the batch stopped at the first study), both failed
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "not-the-password-42" not in json.dumps(rows, default=str)
    assert pacs.count_instances() == len(corpus.files)  # nothing written


# --- a PACS that refuses Comprehensive 3D SR (a small real HTTP server) -------------------------


def test_comprehensive_sr_fallback_and_a_stow_with_content_length(httpserver, corpus, results):
    from werkzeug.wrappers import Response

    headers_seen: list[dict] = []
    stored: list[str] = []
    by_study: dict[str, list] = {}
    for f in corpus.files:
        by_study.setdefault(f.study_uid, []).append(
            pydicom.dcmread(f.path, stop_before_pixels=True)
        )

    def qido_studies(request):
        study_uid = request.args["StudyInstanceUID"]
        ds = by_study[study_uid][0]
        keep = pydicom.Dataset()
        for k in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
            setattr(keep, k, ds.data_element(k).value)
        return Response(json.dumps([keep.to_json_dict()]), content_type="application/dicom+json")

    def qido_instances(request):
        study_uid = request.path.split("/")[3]
        sop = request.args["SOPInstanceUID"]
        hits = [ds for ds in by_study.get(study_uid, []) if ds.SOPInstanceUID == sop]
        out = []
        for ds in hits:
            keep = pydicom.Dataset()
            for k in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "Modality"):
                setattr(keep, k, ds.data_element(k).value)
            out.append(keep.to_json_dict())
        return Response(json.dumps(out), content_type="application/dicom+json")

    def stow(request):
        headers_seen.append(dict(request.headers))
        body = request.get_data()
        start = body.index(b"\r\n\r\n") + 4
        end = body.rindex(b"\r\n--")
        ds = pydicom.dcmread(io.BytesIO(body[start:end]))
        item = {"00081150": {"vr": "UI", "Value": [ds.SOPClassUID]},
                "00081155": {"vr": "UI", "Value": [ds.SOPInstanceUID]}}  # fmt: skip
        if ds.SOPClassUID == srmod.COMPREHENSIVE_3D_SR:
            item["00081197"] = {"vr": "US", "Value": [0x0122]}
            answer = {"00081198": {"vr": "SQ", "Value": [item]}}
            return Response(json.dumps(answer), status=409, content_type="application/dicom+json")
        stored.append(str(ds.SOPInstanceUID))
        answer = {"00081199": {"vr": "SQ", "Value": [item]}}
        return Response(json.dumps(answer), status=200, content_type="application/dicom+json")

    httpserver.expect_request("/dicom-web/studies", method="GET").respond_with_handler(qido_studies)
    for study_uid in corpus.studies:
        httpserver.expect_request(
            f"/dicom-web/studies/{study_uid}/instances", method="GET"
        ).respond_with_handler(qido_instances)
        httpserver.expect_request(
            f"/dicom-web/studies/{study_uid}", method="POST"
        ).respond_with_handler(stow)

    from tasks.dicom.pacs.config import build_entry

    entry = build_entry("strict", {"url": httpserver.url_for("/dicom-web")}, "CXRSCREEN", "test")
    a = model_id(results, "a-1")
    sessions = session_factory(connect(results))
    summary = publish_results(sessions, DicomWebDestination(entry), model_ids=[a])
    assert (summary.sent, summary.failed, summary.fallback_comprehensive) == (3, 0, 3)
    assert len(stored) == 3 and len(headers_seen) == 6
    for h in headers_seen:  # never chunked: the length is announced
        assert int(h["Content-Length"]) > 0 and "Transfer-Encoding" not in h
        assert h["Content-Type"].startswith('multipart/related; type="application/dicom"')
    with sessions.begin() as session:
        rows = publications(session, model_id=a)
    assert {r["sr_sop_class_uid"] for r in rows} == {srmod.COMPREHENSIVE_SR}
    first = rows[0]["pacs_answer"]["first_attempt"]
    assert first["sop_class_uid"] == srmod.COMPREHENSIVE_3D_SR and "0x0122" in first["error"]


# --- the command line, on PostgreSQL ------------------------------------------------------------


def test_screen_write_back_then_the_publish_command_on_postgresql(
    pacs, corpus, pg_url, tmp_path, prefect_api_url
):
    pacs.upload_files(f.path for f in corpus.files)
    env = {
        "PREFECT_API_URL": prefect_api_url,
        "CXR_SCREEN_HOME": str(tmp_path / "home"),
        "CXR_SCREEN_PACS__ORTHANC__URL": pacs.dicomweb_url,
        "CXR_SCREEN_PACS__ORTHANC__USERNAME": pacs.username,
        "CXR_SCREEN_PACS__ORTHANC__PASSWORD": pacs.password,
    }
    done = cli(
        "screen", str(corpus.folder), "--model", str(corpus.model_a), "--db", pg_url,
        "--workers", "0", "--device", "cpu", "--json", "--write-back", "orthanc",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["predicted"] == len(corpus.files)
    written = summary["write_back"]
    assert (written["considered"], written["sent"], written["failed"]) == (3, 3, 0)
    assert pacs.password not in done.stdout + done.stderr
    assert unpublished(pg_url) == []
    assert pacs.count_instances() == len(corpus.files) + 3

    again = cli("publish", "--pacs", "orthanc", "--db", pg_url, "--json", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["considered"] == 0
    table = cli("publish", "--pacs", "orthanc", "--db", pg_url, "--all", env=env, cwd=tmp_path)
    assert table.returncode == 0 and "3 sent, 0 failed" in table.stdout
    assert pacs.count_instances() == len(corpus.files) + 3  # replaced, not added

    env["CXR_SCREEN_PACS__ORTHANC__PASSWORD"] = "not-the-password-42"
    refused = cli("publish", "--pacs", "orthanc", "--db", pg_url, "--all", env=env, cwd=tmp_path)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and "not-the-password-42" not in refused.stderr
    unknown = cli("screen", str(corpus.folder), "--write-back", "nowhere", env=env, cwd=tmp_path)
    assert unknown.returncode == 2 and "no PACS named 'nowhere'" in unknown.stderr
