"""Selection policy: decisions, reasons, serialisation, and one outcome per file on real data."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import data_store
import pytest
from pydicom.data import get_testdata_file

from tasks.dicom.discovery import discover
from tasks.dicom.headers import InstanceHeader, read_header
from tasks.dicom.outcomes import InputError, SkipReason
from tasks.dicom.selection import DEFAULT_POLICY, DX_FOR_PROCESSING, SelectionPolicy, select

KEY = b"selection-test"
DATA_STORE = Path(data_store.__file__).parent / "data"
CORPUS = Path(get_testdata_file("CT_small.dcm")).parent

CHEST_PA = InstanceHeader(
    source_uri="/x/a.dcm",
    study_instance_uid="1.2.3",
    series_instance_uid="1.2.3.4",
    sop_instance_uid="1.2.3.4.5",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
    transfer_syntax_uid="1.2.840.10008.1.2.1",
    modality="CR",
    body_part_examined="CHEST",
    view_position="PA",
    view_source="ViewPosition",
    presentation_intent=None,
    photometric_interpretation="MONOCHROME1",
    rows=2048,
    columns=2048,
    bits_allocated=16,
    bits_stored=12,
    pixel_representation=0,
    samples_per_pixel=1,
    number_of_frames=1,
    study_date=None,
    accession_number=None,
    patient_id_hash=None,
)


def with_(**changes: object) -> InstanceHeader:
    return replace(CHEST_PA, **changes)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"modality": "DX", "view_position": "AP"}, None),
        ({"modality": "CT"}, "Modality 'CT' is not one of CR, DX"),
        ({"modality": None}, "Modality is missing; only CR, DX are screened"),
        (
            {"view_position": "LL"},
            "ViewPosition 'LL' is a lateral view; only PA, AP are screened",
        ),
        (
            {"view_position": "LATERAL", "view_source": "SeriesDescription"},
            "View 'LATERAL' (SeriesDescription) is a lateral view; only PA, AP are screened",
        ),
        (
            {"view_position": "RLO"},
            "ViewPosition 'RLO' is an oblique view; only PA, AP are screened",
        ),
        (
            {"view_position": "LLD"},
            "ViewPosition 'LLD' is a decubitus view; only PA, AP are screened",
        ),
        ({"view_position": "XYZ"}, "ViewPosition 'XYZ' is not one of PA, AP"),
        ({"view_position": None, "view_source": None}, None),  # accepted by default
        (
            {"body_part_examined": "EXTREMITY"},
            "BodyPartExamined 'EXTREMITY' is not one of CHEST, THORAX, TORAX, LUNG",
        ),
        ({"body_part_examined": "CHEST_PA"}, None),
        ({"body_part_examined": "PORT CHEST"}, None),
        ({"body_part_examined": "THORAX"}, None),
        ({"body_part_examined": "chest-abdomen"}, None),
        ({"body_part_examined": None}, None),
        (
            {"body_part_examined": "CHESTX"},
            "BodyPartExamined 'CHESTX' is not one of CHEST, THORAX, TORAX, LUNG",
        ),
        ({"number_of_frames": 2}, "NumberOfFrames is 2; only single-frame images are screened"),
        ({"photometric_interpretation": "MONOCHROME2"}, None),
        (
            {"photometric_interpretation": "RGB", "samples_per_pixel": 3},
            "PhotometricInterpretation 'RGB' is not grayscale; only MONOCHROME1, MONOCHROME2 "
            "are screened",
        ),
        (
            {"photometric_interpretation": "PALETTE COLOR"},
            "PhotometricInterpretation 'PALETTE COLOR' is not grayscale; only MONOCHROME1, "
            "MONOCHROME2 are screened",
        ),
        (
            {"samples_per_pixel": 3},
            "SamplesPerPixel is 3; only single-sample (grayscale) images are screened",
        ),
        ({"photometric_interpretation": None}, None),  # the pixel path fails it, with reason
        (
            {"modality": "DX", "sop_class_uid": DX_FOR_PROCESSING},
            "A 'For Processing' image (raw detector data, not for display); only "
            "'For Presentation' images are screened",
        ),
        ({"presentation_intent": "FOR PROCESSING"}, "A 'For Processing' image"),
        ({"presentation_intent": "FOR PRESENTATION"}, None),
        # The first failing rule is the one reported.
        ({"modality": "MR", "view_position": "LL"}, "Modality 'MR' is not one of CR, DX"),
    ],
)
def test_default_policy_decisions(changes: dict[str, object], reason: str | None) -> None:
    got = select(with_(**changes))
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason)


def test_configured_policy() -> None:
    frontal_only = SelectionPolicy(accept_missing_view=False, accept_missing_body_part=False)
    unknown_view = with_(view_position=None, view_source=None)
    assert select(unknown_view, frontal_only) == (
        "the view is unknown (no ViewPosition, ViewCodeSequence or view named in "
        "SeriesDescription/ProtocolName); only PA, AP are screened"
    )
    assert select(with_(body_part_examined=None), frontal_only) == (
        "BodyPartExamined is missing; only CHEST, THORAX, TORAX, LUNG are screened"
    )
    lenient = SelectionPolicy(
        modalities=["cr", "dx", "ct"],
        views=["pa", "ap", "ll"],
        single_frame_only=False,
        grayscale_only=False,
        presentation_only=False,
    )
    assert lenient.modalities == ("CR", "DX", "CT")
    for changes in (
        {"modality": "ct"},
        {"view_position": "LL"},
        {"number_of_frames": 4},
        {"photometric_interpretation": "RGB", "samples_per_pixel": 3},
        {"sop_class_uid": DX_FOR_PROCESSING},
    ):
        assert select(with_(**changes), lenient) is None, changes


def test_policy_is_stored_as_json_and_identified_by_hash() -> None:
    stored = json.loads(json.dumps(DEFAULT_POLICY.to_dict()))
    assert stored["modalities"] == ["CR", "DX"]
    assert stored["accept_missing_view"] is True
    assert SelectionPolicy.from_dict(stored) == DEFAULT_POLICY
    assert SelectionPolicy.from_dict(stored).sha256 == DEFAULT_POLICY.sha256
    other = SelectionPolicy(accept_missing_view=False)
    assert other.sha256 != DEFAULT_POLICY.sha256
    assert len(DEFAULT_POLICY.sha256) == 64
    with pytest.raises(ValueError, match="unknown selection policy field"):
        SelectionPolicy.from_dict(stored | {"colour": "blue"})
    with pytest.raises(ValueError, match="modalities should list at least one"):
        SelectionPolicy(modalities=())
    with pytest.raises(ValueError, match="views should be a list of strings instead of 'PA'"):
        SelectionPolicy(views="PA")  # type: ignore[arg-type]


# --- real files --------------------------------------------------------------------------------


def outcome(entry, policy: SelectionPolicy = DEFAULT_POLICY) -> tuple[str, str | None]:
    try:
        reason = select(read_header(entry, KEY), policy)
    except InputError as exc:
        return "failed", str(exc)
    except SkipReason as exc:
        return "skipped", str(exc)
    return ("selected", None) if reason is None else ("skipped", reason)


def test_real_files_only_the_chest_radiograph_is_selected() -> None:
    results = {e.uri.rsplit("/", 1)[-1]: outcome(e) for e in discover([DATA_STORE])}
    selected = sorted(name for name, (kind, _) in results.items() if kind == "selected")
    assert selected == ["RG1_J2KI.dcm", "RG1_J2KR.dcm", "RG1_UNCI.dcm", "RG1_UNCR.dcm"]
    assert results["RG3_UNCR.dcm"] == (
        "skipped",
        "BodyPartExamined 'EXTREMITY' is not one of CHEST, THORAX, TORAX, LUNG",
    )
    assert results["MR2_UNCR.dcm"] == ("skipped", "Modality 'MR' is not one of CR, DX")
    assert results["US1_UNCR.dcm"] == ("skipped", "Modality 'US' is not one of CR, DX")
    for name, (kind, reason) in results.items():
        if kind == "skipped" and not name.startswith("RG3"):
            assert reason.startswith("Modality"), (name, reason)


def test_every_file_of_a_mixed_tree_and_its_archives_ends_in_one_outcome(tmp_path: Path) -> None:
    """Conservation: files seen = selected + skipped + failed, archives included."""
    root = tmp_path / "drop"
    shutil.copytree(CORPUS, root / "pydicom")
    (root / "cr").mkdir()
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        shutil.copy(DATA_STORE / name, root / "cr" / name)
    with zipfile.ZipFile(root / "old.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(DATA_STORE / "RG1_J2KR.dcm", "2004/rg1.dcm")
        zf.write(CORPUS / "CT_small.dcm", "2004/ct.dcm")
        zf.writestr("2004/../../escape.dcm", b"x")
        zf.writestr("notes.txt", "hello")
    with tarfile.open(root / "old.tar.gz", "w:gz") as tf:
        tf.add(DATA_STORE / "RG1_UNCI.dcm", "a/rg1.dcm")
        tf.add(CORPUS / "rtplan_truncated.dcm", "a/broken.dcm")
    (root / "empty.dcm").write_bytes(b"")

    seen = 0
    counts = {"selected": 0, "skipped": 0, "failed": 0}
    by_uri = {}
    for entry in discover([root]):
        seen += 1
        kind, reason = outcome(entry)
        counts[kind] += 1
        by_uri[entry.uri.removeprefix(str(root) + "/")] = (kind, reason)
    assert seen == sum(counts.values()) == len(by_uri)
    assert counts["selected"] == 3
    assert sorted(u for u, (k, _) in by_uri.items() if k == "selected") == [
        "cr/RG1_UNCR.dcm",
        "old.tar.gz!/a/rg1.dcm",
        "old.zip!/2004/rg1.dcm",
    ]
    # pydicom's own CR files are cervical spines: CR, but not chest.
    assert by_uri["pydicom/dicomdirtests/77654033/CR1/6154"] == (
        "skipped",
        "BodyPartExamined 'CSPINE' is not one of CHEST, THORAX, TORAX, LUNG",
    )
    assert by_uri["old.zip!/2004/../../escape.dcm"][0] == "failed"
    assert "path traversal" in by_uri["old.zip!/2004/../../escape.dcm"][1]
    assert by_uri["old.tar.gz!/a/broken.dcm"][0] == "failed"
    assert by_uri["empty.dcm"] == ("failed", "the file is empty (0 bytes)")
    assert by_uri["old.zip!/notes.txt"][0] == "failed"
    assert by_uri["cr/RG3_UNCR.dcm"][0] == "skipped"
    assert counts["skipped"] > 100 and counts["failed"] > 10
