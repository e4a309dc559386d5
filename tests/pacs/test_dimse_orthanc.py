"""DIMSE against a real Orthanc: C-ECHO, C-FIND per modality and under a result cap, C-MOVE to
our own SCP and C-GET, with the stored transfer syntax and pixels preserved."""

from __future__ import annotations

import pytest
from orthanc import Modality, Orthanc, free_port
from pacs_support import (
    REAL_FILES,
    dimse_entry,
    pixels,
    real_file,
    sop_uid_of,
    synth_file,
    transfer_syntax_of,
)

from tasks.dicom.pacs.common import PacsError, PacsUnreachable, StudyWindow, parse_source_uri
from tasks.dicom.pacs.config import with_overrides
from tasks.dicom.pacs.dimse import DimseClient
from tasks.dicom.pacs.source import PacsRetrieval, RetrievalReport, echo, find_studies

REAL_DAY = StudyWindow.parse("2004-08-26")


def retrieval(entry, **kwargs) -> PacsRetrieval:
    return PacsRetrieval(DimseClient(entry, backoff=0.01), **kwargs)


def test_c_echo_and_unreachable(pacs, move_port):
    result = echo(dimse_entry(pacs, move_port))
    assert result.method == "C-ECHO"
    gone = dimse_entry(pacs, move_port, url=f"dimse://NOBODY@127.0.0.1:{free_port()}")
    with pytest.raises(PacsUnreachable) as info:
        echo(gone)
    assert str(info.value) == (
        f"PACS 'test-dimse' (DIMSE NOBODY@127.0.0.1:{gone.port}) is unreachable: connection refused"
    )


def test_c_find_per_modality_and_series_counts(pacs, move_port, tmp_path):
    cr = synth_file(tmp_path, study=1, modality="CR")
    dx = [synth_file(tmp_path, study=2, instance=i, modality="DX") for i in range(3)]
    ct = synth_file(tmp_path, study=3, modality="CT")
    pacs.upload_files(f.path for f in [cr, *dx, ct])
    client = DimseClient(dimse_entry(pacs, move_port))
    try:
        found = find_studies(client, StudyWindow.parse("2026-11-28"), ("CR", "DX"))
        assert {s.study_uid for s in found} == {cr.study_uid, dx[0].study_uid}
        (series,) = client.find_series(dx[0].study_uid)
        assert (series.modality, series.body_part, series.announced) == ("DX", "CHEST", 3)
        assert {r.sop_uid for r in client.find_instances(series)} == {f.sop_uid for f in dx}
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["move", "get"])
def test_retrieval_keeps_the_stored_syntax_and_the_pixels(pacs, move_port, tmp_path, mode):
    pacs.upload_files(real_file(name) for name in REAL_FILES)
    extra = [
        synth_file(tmp_path, study=20 + i, syntax=syntax, study_date="20040826")
        for i, syntax in enumerate(("jpeg_ls", "rle", "jpeg_lossless_sv1", "j2k_lossless"))
    ]
    pacs.upload_files(f.path for f in extra)
    entry = dimse_entry(pacs, move_port, retrieve=mode)
    with retrieval(entry, window=REAL_DAY, body_parts=None) as run:
        files = list(run)
    originals = {sop_uid_of(p.read_bytes()): p for p in map(real_file, REAL_FILES)}
    originals.update({f.sop_uid: f.path for f in extra})
    assert len(files) == len(originals) and all(f.error is None for f in files)
    for f in files:
        assert f.uri.startswith("dimse://test-dimse/studies/")
        original = originals[parse_source_uri(f.uri)[2].sop_uid]
        assert sop_uid_of(f.data) == parse_source_uri(f.uri)[2].sop_uid
        assert transfer_syntax_of(f.data) == transfer_syntax_of(original.read_bytes())
        assert (pixels(f.data) == pixels(original)).all()
    assert all(c.complete for c in run.completeness.values())
    assert run.report.instances_retrieved == len(originals)


def test_one_association_per_connection_for_many_instances(pacs, move_port, tmp_path):
    corpus = [
        synth_file(tmp_path, study=i, instance=j, size=48) for i in range(8) for j in range(2)
    ]
    pacs.upload_files(f.path for f in corpus)
    entry = with_overrides(dimse_entry(pacs, move_port), connections=2)
    with retrieval(entry, window=StudyWindow.parse("2026-11-28")) as run:
        files = list(run)
        # the study query's association, then per worker one C-FIND and one C-MOVE
        # association kept open for all its studies
        assert len(run.client._associations) <= 1 + 2 * 2
    assert sorted(parse_source_uri(f.uri)[2].sop_uid for f in files) == sorted(
        f.sop_uid for f in corpus
    )


def test_capped_c_find_splits_the_window(tmp_path, move_port):
    port = free_port()
    with Orthanc(
        tmp_path / "capped",
        modalities={"cxrscreen": Modality("CXRSCREEN", "127.0.0.1", port)},
        config={"LimitFindResults": 3},
    ) as capped:
        files = [
            synth_file(tmp_path, study=i, study_date=f"202611{1 + i % 5:02d}", size=48)
            for i in range(14)
        ]
        capped.upload_files(f.path for f in files)
        client = DimseClient(dimse_entry(capped, port))
        report = RetrievalReport("capped")
        found = find_studies(client, StudyWindow.parse("2026-11-01..2026-11-30"), ["CR"], report)
        client.close()
    assert sorted(s.study_uid for s in found) == sorted(f.study_uid for f in files)
    assert report.queries > 1 and not report.truncated


def test_a_move_destination_the_pacs_cannot_reach_fails_each_instance(pacs, move_port, tmp_path):
    f = synth_file(tmp_path, study=1)
    pacs.upload_files([f.path])
    pacs.register_modality("wrongport", Modality("CXRWRONG", "127.0.0.1", free_port()))
    entry = dimse_entry(pacs, move_port, calling_aet="CXRWRONG", retries=1)
    with retrieval(entry, window=StudyWindow.parse("2026-11-28")) as run:
        (only,) = list(run)
    assert only.error.startswith(
        f"PACS 'test-dimse' did not send instance {f.sop_uid} over C-MOVE after 2 attempt(s): "
        "C-MOVE status 0x"
    )
    assert run.partial_studies()[0].study_uid == f.study_uid


def test_unknown_calling_ae_title_is_refused_with_the_reason(pacs, move_port, tmp_path):
    pacs.upload_files([synth_file(tmp_path, study=1).path])
    entry = dimse_entry(pacs, move_port, calling_aet="STRANGER", retries=0)
    with (
        pytest.raises(PacsError) as info,
        retrieval(entry, window=StudyWindow.parse("2026-11-28")) as run,
    ):
        run.prepare()
    assert "does it allow AE title 'STRANGER'" in str(info.value) and "\n" not in str(info.value)


def test_c_move_without_move_port_says_what_is_missing(pacs, move_port, tmp_path):
    pacs.upload_files([synth_file(tmp_path, study=1).path])
    entry = dimse_entry(pacs, move_port)
    entry = type(entry)(**{**entry.__dict__, "move_port": None})
    with retrieval(entry, window=StudyWindow.parse("2026-11-28")) as run:
        run.prepare()  # C-FIND needs no port
        (only,) = list(run.files())
    assert only.uri == "dimse://test-dimse"
    assert only.error.startswith("PACS 'test-dimse': C-MOVE needs move_port")
    assert run.broken == only.error
