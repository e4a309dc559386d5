"""DICOMweb against a real Orthanc: QIDO per modality, paging, WADO-RS, completeness, spool."""

from __future__ import annotations

import os
import stat

import pytest
from pacs_support import (
    REAL_FILES,
    dicomweb_entry,
    pixels,
    real_file,
    sop_uid_of,
    synth_file,
    transfer_syntax_of,
)

from tasks.dicom.pacs.common import (
    PacsAuthError,
    PacsUnreachable,
    StudyWindow,
    parse_source_uri,
)
from tasks.dicom.pacs.config import with_overrides
from tasks.dicom.pacs.dicomweb import DicomWebClient
from tasks.dicom.pacs.source import PacsRetrieval, RetrievalReport, echo, find_studies

REAL_DAY = StudyWindow.parse("2004-08-26")


def retrieval(entry, **kwargs) -> PacsRetrieval:
    return PacsRetrieval(DicomWebClient(entry, backoff=0.01), **kwargs)


def test_echo_answers_and_wrong_password_is_one_line_without_the_password(pacs):
    entry = dicomweb_entry(pacs)
    result = echo(entry)
    assert result.method == "QIDO-RS" and result.seconds < 5

    wrong = dicomweb_entry(pacs, password="not-the-password-42")
    with pytest.raises(PacsAuthError) as info:
        echo(wrong)
    message = str(info.value)
    assert "'test'" in message and "401" in message and "\n" not in message
    assert "not-the-password-42" not in message and pacs.password not in message


def test_unreachable_pacs_is_one_line_naming_it(pacs):
    from orthanc import free_port

    entry = dicomweb_entry(pacs, url=f"http://127.0.0.1:{free_port()}/dicom-web", retries=1)
    with pytest.raises(PacsUnreachable) as info:
        echo(entry)
    assert str(info.value).startswith("PACS 'test' (DICOMweb http://127.0.0.1:")
    assert "connection refused" in str(info.value) and "\n" not in str(info.value)
    run = retrieval(entry, window=REAL_DAY)
    with pytest.raises(PacsUnreachable, match="unreachable: connection refused"):
        run.prepare()
    # Without prepare(), the source keeps the seam's contract: one errored entry naming it.
    (only,) = list(retrieval(entry, window=REAL_DAY).files())
    assert only.uri == "dicomweb://test" and "unreachable: connection refused" in only.error


def test_one_query_per_modality_and_series_filtered_by_modality_and_body_part(pacs, tmp_path):
    cr = synth_file(tmp_path, study=1, modality="CR")
    dx = synth_file(tmp_path, study=2, modality="DX")
    ct = synth_file(tmp_path, study=3, modality="CT")
    knee = synth_file(tmp_path, study=4, modality="CR", body_part="KNEE")
    other_day = synth_file(tmp_path, study=5, modality="CR", study_date="20261127")
    pacs.upload_files(f.path for f in (cr, dx, ct, knee, other_day))
    client = DicomWebClient(dicomweb_entry(pacs))
    report = RetrievalReport("test")
    found = find_studies(client, StudyWindow.parse("2026-11-28"), ("CR", "DX"), report)
    assert {s.study_uid for s in found} == {cr.study_uid, dx.study_uid, knee.study_uid}
    assert report.queries == 2  # one per modality, nothing capped
    dx_only = find_studies(client, StudyWindow.parse("2026-11-27..2026-11-28"), ("DX",))
    assert [s.study_uid for s in dx_only] == [dx.study_uid]

    run = retrieval(dicomweb_entry(pacs), window=StudyWindow.parse("2026-11-27..2026-11-28"))
    with run:
        files = list(run)
    got = {parse_source_uri(f.uri)[2].sop_uid for f in files}
    assert got == {cr.sop_uid, dx.sop_uid, other_day.sop_uid}  # knee series filtered
    assert run.report.series_filtered == 1 and run.report.instances_retrieved == 3
    assert all(c.complete for c in run.completeness.values())


def test_paging_over_more_studies_than_the_limit(pacs, tmp_path):
    # 14 studies on one day and 9 on others, page size 4: the window is split, and the single
    # day that is still full is read with a larger page (Orthanc's offset is unusable with a
    # ModalitiesInStudy filter).
    files = [synth_file(tmp_path, study=i, study_date="20261128") for i in range(14)]
    files += [
        synth_file(tmp_path, study=100 + i, study_date=f"202611{10 + i:02d}") for i in range(9)
    ]
    pacs.upload_files(f.path for f in files)
    client = DicomWebClient(dicomweb_entry(pacs, page_size=4))
    report = RetrievalReport("test")
    found = find_studies(client, StudyWindow.parse("2026-11-01..2026-11-30"), ("CR",), report)
    assert sorted(s.study_uid for s in found) == sorted(f.study_uid for f in files)
    assert len(found) == len(files) and not report.truncated
    assert report.queries > 2


def test_wado_transfer_syntax_star_returns_the_stored_bytes(pacs, tmp_path):
    pacs.upload_files(real_file(name) for name in REAL_FILES)
    j2k = synth_file(tmp_path, study=9, syntax="j2k_lossless", study_date="20040826")
    pacs.upload_files([j2k.path])
    with retrieval(dicomweb_entry(pacs), window=REAL_DAY, body_parts=None) as run:
        files = list(run)
    assert len(files) == 4 and all(f.error is None for f in files)
    originals = {sop_uid_of(p.read_bytes()): p for p in [*map(real_file, REAL_FILES), j2k.path]}
    for f in files:
        assert f.container == "inline" and f.uri.startswith("dicomweb://test/studies/")
        original = originals[sop_uid_of(f.data)]
        assert f.data == original.read_bytes()  # no transcoding: the stored file itself
        assert (pixels(f.data) == pixels(original)).all()
    syntaxes = {transfer_syntax_of(f.data) for f in files}
    assert "1.2.840.10008.1.2.4.90" in syntaxes  # JPEG 2000 lossless came as stored
    assert run.report.bytes_retrieved == sum(f.size for f in files)


def test_instance_deleted_between_query_and_retrieve_fails_with_its_uid(pacs, tmp_path):
    a = synth_file(tmp_path, study=1, instance=0)
    b = synth_file(tmp_path, study=1, instance=1)
    pacs.upload_files([a.path, b.path])
    run = retrieval(dicomweb_entry(pacs), window=StudyWindow.parse("2026-11-28"))
    client = run.client
    original = client.find_instances

    def list_then_delete(series):
        refs = original(series)
        pacs.delete_instance(b.sop_uid)  # gone after it was listed
        return refs

    client.find_instances = list_then_delete
    with run:
        files = {parse_source_uri(f.uri)[2].sop_uid: f for f in run}
    assert files[a.sop_uid].error is None
    reason = files[b.sop_uid].error
    assert reason == (
        f"PACS 'test' has no instance {b.sop_uid} (HTTP 404: deleted since the query?)"
    )
    study = run.completeness[a.study_uid]
    assert not study.complete and study.arrived == 1 and study.announced == 2
    assert "announced 2 instance(s)" in study.reason


def test_partial_study_is_complete_after_the_next_pull(pacs, tmp_path):
    a = synth_file(tmp_path, study=3, instance=0)
    b = synth_file(tmp_path, study=3, instance=1)
    pacs.upload_files([a.path, b.path])
    entry = dicomweb_entry(pacs)
    run = retrieval(entry, window=StudyWindow.parse("2026-11-28"))
    original = run.client.find_instances

    def list_then_hold_back(series):
        refs = original(series)
        pacs.delete_instance(b.sop_uid)  # announced and listed, then held back by the PACS
        return refs

    run.client.find_instances = list_then_hold_back
    with run:
        assert len([f for f in run if f.error is None]) == 1
    assert [c.study_uid for c in run.partial_studies()] == [a.study_uid]
    assert run.report.studies_partial == 1 and run.report.instances_failed == 1

    pacs.upload_files([b.path])  # the instance is back: the next run pulls the study again
    again = retrieval(entry, study_uids=[a.study_uid])
    with again:
        files = list(again)
    assert {parse_source_uri(f.uri)[2].sop_uid for f in files} == {a.sop_uid, b.sop_uid}
    assert all(f.error is None for f in files)
    assert again.completeness[a.study_uid].complete and not again.partial_studies()


def test_spool_is_private_and_emptied(pacs, tmp_path):
    pacs.upload_files(real_file(name) for name in REAL_FILES)
    spool_root = tmp_path / "spool"
    run = retrieval(dicomweb_entry(pacs), window=REAL_DAY, spool_dir=spool_root, connections=2)
    files = list(run)
    folders = list(spool_root.iterdir())
    assert len(folders) == 1 and stat.S_IMODE(folders[0].stat().st_mode) == 0o700
    for f in files:
        assert f.container == "file" and os.path.dirname(f.path) == str(folders[0])
        assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
        assert f.read_bytes() == real_file_for(f.read_bytes()).read_bytes()
    run.release(files[:1])
    assert not os.path.exists(files[0].path) and os.path.exists(files[1].path)
    run.close()
    assert list(spool_root.iterdir()) == []


def real_file_for(data: bytes):
    uid = sop_uid_of(data)
    return next(real_file(n) for n in REAL_FILES if sop_uid_of(real_file(n).read_bytes()) == uid)


@pytest.mark.parametrize("connections", [1, 4])
def test_connections_retrieve_everything_once(pacs, tmp_path, connections):
    corpus = [synth_file(tmp_path, study=i, instance=j) for i in range(6) for j in range(3)]
    pacs.upload_files(f.path for f in corpus)
    entry = with_overrides(dicomweb_entry(pacs), connections=connections)
    with retrieval(entry, window=StudyWindow.parse("2026-11-28")) as run:
        files = list(run)
    assert sorted(parse_source_uri(f.uri)[2].sop_uid for f in files) == sorted(
        f.sop_uid for f in corpus
    )
    # A study's files come together (all of one study before the next study's last file).
    studies = [parse_source_uri(f.uri)[2].study_uid for f in files]
    assert all(studies[i : i + 3] == [studies[i]] * 3 for i in range(0, len(studies), 3))
    assert run.report.studies == 6 and run.report.studies_partial == 0


def test_entries_are_input_files_the_header_scan_and_pixel_path_take(pacs, tmp_path):
    import pickle

    from model.spec import PreprocessSpec
    from tasks.dicom.headers import read_header
    from tasks.dicom.pixels import preprocess
    from tasks.dicom.selection import select
    from tasks.dicom.sources import InputFile, Source

    f = synth_file(tmp_path, study=1, syntax="jpeg_ls")
    pacs.upload_files([f.path, real_file("RG1_J2KR.dcm")])
    for spool in (None, tmp_path / "spool"):
        run = retrieval(
            dicomweb_entry(pacs), window=StudyWindow.parse("2026-11-28"), spool_dir=spool
        )
        assert isinstance(run, Source) and run.uri == "dicomweb://test"
        with run:
            (src,) = list(run.files())
            assert isinstance(src, InputFile)
            header = read_header(pickle.loads(pickle.dumps(src)), b"k" * 32)
            assert header.sop_instance_uid == f.sop_uid and select(header) is None
            again = pickle.loads(pickle.dumps(src))  # as a spawn-context decode worker gets it
            image = preprocess(again.read_bytes(), PreprocessSpec()).image
            expected = preprocess(f.path.read_bytes(), PreprocessSpec()).image
            assert (image == expected).all()


def test_pacs_sources_resolves_a_configured_name_and_reports_completeness(pacs, tmp_path):
    from tasks.dicom.pacs.config import load_pacs_config
    from tasks.dicom.pacs.source import pacs_sources
    from tasks.dicom.selection import SelectionPolicy

    cr = synth_file(tmp_path, study=1, modality="CR")
    dx = synth_file(tmp_path, study=2, modality="DX")
    pacs.upload_files([cr.path, dx.path])
    config = load_pacs_config(
        {
            "CXR_SCREEN_PACS__MAIN__URL": pacs.dicomweb_url,
            "CXR_SCREEN_PACS__MAIN__USERNAME": pacs.username,
            "CXR_SCREEN_PACS__MAIN__PASSWORD": pacs.password,
        }
    )
    policy = SelectionPolicy(modalities=("DX",))
    with pacs_sources(
        "pacs://main", config, window=StudyWindow.parse("2026-11-28"), policy=policy
    ) as run:
        assert [s.study_uid for s in run.prepare()] == [dx.study_uid]
        (src,) = list(run.files())
        assert src.uri.startswith(f"dicomweb://main/studies/{dx.study_uid}/")
        assert run.completeness_of(src.uri).complete
        assert run.completeness_of("/data/x.dcm") is None and run.broken is None
        assert "1/1 instances retrieved" in run.report.summary()
