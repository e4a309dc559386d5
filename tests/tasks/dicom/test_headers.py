"""Header scan on real files (pydicom's corpus, pydicom-data) and on files built here."""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from datetime import date
from pathlib import Path

import data_store
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.dicom.discovery import SourceFile, discover
from tasks.dicom.headers import InstanceHeader, group_by_study, keyed_hash, read_header
from tasks.dicom.outcomes import InputError, SkipReason

KEY = b"site-secret-key"
DATA_STORE = Path(data_store.__file__).parent / "data"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
PATIENT_ID = "PID-0042-SECRET"


def source(path: str | Path) -> SourceFile:
    entries = list(discover([path]))
    assert len(entries) == 1
    return entries[0]


def header_of(path: str | Path) -> InstanceHeader:
    return read_header(source(path), KEY)


def write_dicom(
    path: Path, *, preamble: bool = True, implicit: bool = False, **elements: object
) -> Path:
    """A header-only CR instance; ``elements`` set (or, with None, remove) keywords."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
    ds.StudyDate = "20240131"
    ds.AccessionNumber = "ACC123"
    ds.Modality = "CR"
    ds.InstitutionName = "General Hospital " * 3
    ds.PatientID = PATIENT_ID
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows = 2048
    ds.Columns = 2500
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword, value in elements.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CR_IMAGE)
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3")
        meta.TransferSyntaxUID = syntax
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(path, ds, implicit_vr=implicit, little_endian=True)
    return path


# --- real files --------------------------------------------------------------------------------


def test_real_chest_cr_in_both_encodings() -> None:
    full = pydicom.dcmread(DATA_STORE / "RG1_UNCR.dcm", stop_before_pixels=True)
    unc = header_of(DATA_STORE / "RG1_UNCR.dcm")
    j2k = header_of(DATA_STORE / "RG1_J2KR.dcm")
    assert unc.modality == "CR"
    assert unc.body_part_examined == "CHEST"
    assert (unc.view_position, unc.view_source) == ("PA", "ViewPosition")
    assert unc.photometric_interpretation == "MONOCHROME1"
    assert (unc.rows, unc.columns) == (1955, 1841)
    assert (unc.bits_allocated, unc.bits_stored, unc.pixel_representation) == (16, 15, 0)
    assert (unc.samples_per_pixel, unc.number_of_frames) == (1, 1)
    assert unc.sop_class_uid == CR_IMAGE
    assert unc.study_date == date(2004, 8, 26)
    assert unc.accession_number == full.AccessionNumber
    assert unc.patient_id_hash == keyed_hash(KEY, full.PatientID)
    assert unc.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert j2k.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"
    # Same study and series; the JPEG 2000 copy is its own instance.
    assert (j2k.study_instance_uid, j2k.series_instance_uid) == (
        unc.study_instance_uid,
        unc.series_instance_uid,
    )
    assert j2k.sop_instance_uid != unc.sop_instance_uid
    assert unc.notes == () and j2k.notes == ()


def test_header_scan_never_reads_the_pixel_data(tmp_path: Path) -> None:
    """A copy cut 200 bytes into the JPEG 2000 pixel data gives the same header."""
    data = (DATA_STORE / "RG1_J2KR.dcm").read_bytes()
    pixel_tag = data.rindex(b"\xe0\x7f\x10\x00")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: pixel_tag + 200])
    whole = header_of(DATA_STORE / "RG1_J2KR.dcm")
    part = header_of(cut)
    assert part.to_dict() | {"source_uri": ""} == whole.to_dict() | {"source_uri": ""}


def test_real_non_chest_files_read_with_their_modality() -> None:
    rg3 = header_of(DATA_STORE / "RG3_UNCR.dcm")
    assert (rg3.modality, rg3.body_part_examined, rg3.view_position) == ("CR", "EXTREMITY", "AP")
    assert (rg3.rows, rg3.bits_stored) == (1760, 10)
    assert header_of(get_testdata_file("CT_small.dcm")).modality == "CT"
    assert header_of(get_testdata_file("MR_truncated.dcm")).modality == "MR"  # cut in pixels
    emri = header_of(DATA_STORE / "emri_small.dcm")
    assert (emri.modality, emri.number_of_frames) == ("MR", 10)
    rgb = header_of(DATA_STORE / "SC_rgb.dcm")
    assert (rgb.photometric_interpretation, rgb.samples_per_pixel) == ("RGB", 3)
    deflated = header_of(get_testdata_file("image_dfl.dcm"))  # Deflated Explicit VR LE
    assert deflated.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"


def test_files_without_file_meta_are_read_when_they_parse() -> None:
    for name, syntax in (
        ("ExplVR_LitEndNoMeta.dcm", "Explicit VR Little Endian"),
        ("ExplVR_BigEndNoMeta.dcm", "Explicit VR Big Endian"),
    ):
        header = header_of(get_testdata_file(name))
        assert header.modality == "RTPLAN"
        assert header.notes == (
            "no (0002,0010) 'Transfer Syntax UID' in the file meta; "
            f"{syntax} inferred from the data set",
        )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (
            "rtplan_truncated.dcm",
            "the file is truncated: it ends inside (300A,00B0) 'Beam Sequence' before the pixel "
            "data, 265 bytes short",
        ),
        ("no_meta.dcm", "not a DICOM file: there is no 'DICM' prefix at byte 128"),
        ("README.txt", "not a DICOM file"),
        ("zipMR.gz", "not a DICOM file"),
        ("test1.json", "not a DICOM file"),
        (
            "JPEGLSNearLossless_08.dcm",
            "(0020,000D) 'Study Instance UID', (0020,000E) 'Series Instance UID' are missing or "
            "empty; the instance cannot be identified",
        ),
        (
            "meta_missing_tsyntax.dcm",
            "(0008,0018) 'SOP Instance UID', (0020,000D) 'Study Instance UID', "
            "(0020,000E) 'Series Instance UID' are missing or empty",
        ),
        (
            "badVR.dcm",
            "A (0028,0008) 'Number of Frames' value of '1A' is invalid, it must be an integer",
        ),
    ],
)
def test_broken_files_in_pydicoms_corpus_fail_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(InputError) as info:
        header_of(get_testdata_file(name))
    assert str(info.value).startswith(reason)


def test_dicomdir_under_another_name_is_skipped(tmp_path: Path) -> None:
    dicomdir = Path(get_testdata_file("DICOMDIR"))
    renamed = tmp_path / "index.dcm"
    renamed.write_bytes(dicomdir.read_bytes())
    with pytest.raises(SkipReason, match=r"\(0002,0002\).*1\.2\.840\.10008\.1\.3\.10.*DICOMDIR"):
        header_of(renamed)


def test_whole_corpus_reads_without_raising_anything_but_input_errors() -> None:
    corpus = Path(get_testdata_file("CT_small.dcm")).parent
    outcomes = {"read": 0, "failed": 0, "skipped": 0}
    for entry in discover([corpus, DATA_STORE]):
        try:
            read_header(entry, KEY)
            outcomes["read"] += 1
        except InputError:
            outcomes["failed"] += 1
        except SkipReason:
            outcomes["skipped"] += 1
    assert outcomes["read"] > 150
    assert outcomes["failed"] > 10
    assert outcomes["skipped"] == 6  # the DICOMDIR-* variants in dicomdirtests/


# --- identifiers -------------------------------------------------------------------------------


def test_keyed_hash_is_hmac_sha256() -> None:
    # RFC 4231, test case 2.
    assert (
        keyed_hash(b"Jefe", "what do ya want for nothing?")
        == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
    with pytest.raises(ValueError, match="HMAC key must not be empty"):
        keyed_hash(b"", "x")


def test_patient_id_is_only_kept_as_a_keyed_hash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    caplog.set_level(logging.DEBUG)
    long_id = PATIENT_ID * 5  # too long for LO: pydicom would warn if it validated it
    path = write_dicom(tmp_path / "a.dcm", PatientID=long_id)
    header = read_header(source(path), KEY)
    assert header.patient_id_hash == keyed_hash(KEY, long_id)
    assert read_header(source(path), b"other-key").patient_id_hash != header.patient_id_hash
    assert PATIENT_ID not in repr(header)
    assert PATIENT_ID not in str(header.to_dict())
    assert all(PATIENT_ID not in r.getMessage() for r in caplog.records)
    assert all(PATIENT_ID not in str(w.message) for w in recwarn)
    assert header.accession_number == "ACC123"  # kept: reviewers open the study with it

    latin = write_dicom(tmp_path / "b.dcm", PatientID="Müller-7")
    assert header_of(latin).patient_id_hash == keyed_hash(KEY, "Müller-7")
    assert header_of(write_dicom(tmp_path / "c.dcm", PatientID=None)).patient_id_hash is None
    assert header_of(write_dicom(tmp_path / "d.dcm", PatientID="")).patient_id_hash is None
    with pytest.raises(ValueError, match="HMAC key"):
        read_header(source(path), b"")


# --- views and values --------------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return [item]


@pytest.mark.parametrize(
    ("elements", "view", "source_tag"),
    [
        ({"ViewPosition": "pa"}, "PA", "ViewPosition"),
        ({"ViewPosition": "LL"}, "LL", "ViewPosition"),
        ({"ViewCodeSequence": _code("399067008", "SCT", "lateral")}, "LATERAL", "ViewCodeSequence"),
        ({"ViewCodeSequence": _code("272479007", "SCT", "postero-anterior")}, "PA", None),
        ({"ViewCodeSequence": _code("R-10206", "SRT", "antero-posterior")}, "AP", None),
        ({"ViewCodeSequence": _code("X1", "99LOCAL", "Postero-anterior")}, "PA", None),
        ({"ViewCodeSequence": _code("X2", "99LOCAL", "left lateral decubitus")}, "DECUBITUS", None),
        ({"SeriesDescription": "Chest PA"}, "PA", "SeriesDescription"),
        ({"SeriesDescription": "THORAX_AP_LIEGEND"}, "AP", "SeriesDescription"),
        ({"SeriesDescription": "Thorax lat."}, "LATERAL", "SeriesDescription"),
        (
            {"SeriesDescription": "PA + LAT", "ProtocolName": "CHEST 1 VIEW AP"},
            "AP",
            "ProtocolName",
        ),
        ({"SeriesDescription": "Papillon"}, None, None),  # words, not letters
        ({"PatientOrientation": ["P", "F"]}, "LATERAL", "PatientOrientation"),
        ({"PatientOrientation": ["L", "F"]}, None, None),  # frontal, but PA or AP?
        ({"ViewPosition": "", "ImageLaterality": "L"}, None, None),
    ],
)
def test_view_and_its_fallbacks(
    tmp_path: Path, elements: dict[str, object], view: str | None, source_tag: str | None
) -> None:
    elements = {"ViewPosition": None} | elements
    header = header_of(write_dicom(tmp_path / "v.dcm", **elements))
    assert header.view_position == view
    if source_tag is not None:
        assert header.view_source == source_tag
    assert (header.view_source is None) == (view is None)


def test_dates_and_uids(tmp_path: Path) -> None:
    acr = header_of(write_dicom(tmp_path / "a.dcm", StudyDate="2004.01.19"))
    assert acr.study_date == date(2004, 1, 19)
    bad = header_of(write_dicom(tmp_path / "b.dcm", StudyDate="20231340"))
    assert bad.study_date is None
    assert bad.notes == (  # a date field can hold anything: not quoted
        "A (0008,0020) 'Study Date' value is not a valid date (YYYYMMDD, 8 characters read); "
        "recorded as missing",
    )
    hashed_uid = "dccc9599087131742838cc1162a630fea87ba9bf61ac09bfda90d4adfa5ddaed"
    with pytest.raises(InputError) as info:  # a broken anonymiser's hash is not a UID
        header_of(write_dicom(tmp_path / "c.dcm", SOPInstanceUID=hashed_uid))
    assert str(info.value) == (
        "A (0008,0018) 'SOP Instance UID' value is not a valid UID: it holds characters other "
        "than digits and dots; a UID holds only those"
    )
    zero = header_of(write_dicom(tmp_path / "z.dcm", SeriesInstanceUID="1.2.840.0123.4"))
    assert zero.series_instance_uid == "1.2.840.0123.4"
    assert zero.notes == (
        "A (0020,000E) 'Series Instance UID' value has a component with a leading zero, which "
        "the UID rules (PS3.5 9.1) forbid; used as is",
    )
    with pytest.raises(InputError, match=r"^A \(0020,000D\) 'Study Instance UID' value is not a"):
        header_of(write_dicom(tmp_path / "d.dcm", StudyInstanceUID="1.2." + "3" * 70))
    with pytest.raises(InputError, match=r"\(0020,000E\) 'Series Instance UID' has 2 values"):
        header_of(write_dicom(tmp_path / "e.dcm", SeriesInstanceUID=["1.2", "1.3"]))
    with pytest.raises(InputError, match=r"^\(0008,0018\) 'SOP Instance UID' is missing"):
        header_of(write_dicom(tmp_path / "f.dcm", SOPInstanceUID=None))
    absent = header_of(write_dicom(tmp_path / "g.dcm", Modality=None, NumberOfFrames=None))
    assert (absent.modality, absent.number_of_frames) == (None, 1)


# --- not DICOM, empty, truncated ---------------------------------------------------------------


def test_raw_data_set_without_preamble_is_accepted(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "raw.dcm", preamble=False, implicit=True)
    assert path.read_bytes()[128:132] != b"DICM"
    header = header_of(path)
    assert header.modality == "CR"
    assert header.transfer_syntax_uid == ImplicitVRLittleEndian
    assert "Implicit VR Little Endian inferred" in header.notes[0]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty (0 bytes)"),
        (b"%PDF-1.7\n" + os.urandom(3000), "not a DICOM file"),
        (b"short", "not a DICOM file"),
        (bytes(132), "not a DICOM file"),
        (bytes(128) + b"DICM", "(0008,0018) 'SOP Instance UID', (0020,000D)"),
    ],
)
def test_not_dicom_and_empty(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        header_of(path)
    assert str(info.value).startswith(reason)


def test_truncated_headers_name_the_element(tmp_path: Path) -> None:
    data = write_dicom(tmp_path / "whole.dcm").read_bytes()
    cases = {
        # inside a wanted element's value
        "study": (
            data.index(b"1.2.826.0.1.3680043.8.498.2") + 5,
            "(0020,000D) 'Study Instance UID'",
        ),
        # inside an element's header (tag, VR, length)
        "element-header": (data.index(b"\x08\x00\x16\x00UI") + 6, "(0008,0016) 'SOP Class UID'"),
        # inside an element the scan skips by seeking
        "institution": (data.index(b"General Hospital") + 5, "(0008,0080) 'Institution Name'"),
    }
    for name, (cut, element) in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(InputError) as info:
            header_of(path)
        assert str(info.value).startswith(f"the file is truncated: it ends inside {element}")


def test_absurd_element_length_does_not_allocate(tmp_path: Path) -> None:
    data = bytearray(write_dicom(tmp_path / "a.dcm", implicit=True).read_bytes())
    # Implicit VR: tag, 4-byte length. Make Modality claim 4 GB.
    at = data.index(struct.pack("<HH", 0x0008, 0x0060))
    data[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFF0)
    path = tmp_path / "b.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"truncated: it ends inside \(0008,0060\) 'Modality'"):
        header_of(path)


def test_headers_of_archive_members_and_damaged_members(tmp_path: Path) -> None:
    rg1 = (DATA_STORE / "RG1_UNCR.dcm").read_bytes()
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("rg1.dcm", rg1)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # in the pixel data: the header still reads
    bad = tmp_path / "b.zip"
    bad.write_bytes(bytes(damaged))
    (good,) = discover([path])
    (broken,) = discover([bad])
    same = read_header(good, KEY).to_dict() | {"source_uri": ""}
    assert read_header(broken, KEY).to_dict() | {"source_uri": ""} == same
    with pytest.raises(InputError, match="cannot read the archive member: Bad CRC-32"):
        broken.read_bytes()


def test_group_by_study() -> None:
    headers = [
        header_of(DATA_STORE / "RG1_J2KR.dcm"),
        header_of(get_testdata_file("CT_small.dcm")),
        header_of(DATA_STORE / "RG1_UNCR.dcm"),
    ]
    studies = group_by_study(headers)
    assert list(studies) == [headers[0].study_instance_uid, headers[1].study_instance_uid]
    rg1 = studies[headers[0].study_instance_uid]
    assert [h.sop_instance_uid for h in rg1] == sorted(
        [headers[0].sop_instance_uid, headers[2].sop_instance_uid]
    )
    assert group_by_study([]) == {}
