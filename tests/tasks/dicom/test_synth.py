"""The synthetic study generator: realistic headers, reproducible, every syntax round-trips."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pydicom
import pytest

from tasks.dicom import synth
from tasks.dicom.decoders import PixelLayout, correct_stored_bits

LOSSLESS = [s for s in synth.SYNTAXES if s not in synth.LOSSY]


def _pixels(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    layout = PixelLayout(
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, bool(ds.PixelRepresentation)
    )
    return correct_stored_bits(ds.pixel_array, layout)[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    records = synth.write_corpus(out, 14, seed=3, size_range=(96, 160), lateral_fraction=0.3)
    return out, records


def test_corpus_headers_are_realistic_and_labelled(corpus):
    _, records = corpus
    assert {r["syntax"] for r in records} == set(synth.SYNTAXES)  # 14 studies cycle all 12
    for rec in records:
        ds = pydicom.dcmread(rec["path"])
        assert ds.Modality in ("CR", "DX")
        assert ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition in ("PA", "AP", "LL")
        assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
        assert 8 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
        assert ds.file_meta.TransferSyntaxUID == rec["transfer_syntax"]
        assert (
            ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == rec["sop_instance_uid"]
        )
        assert ds.StudyInstanceUID == rec["study_instance_uid"]
        assert str(ds.PatientID) == rec["patient_id"] and str(ds.PatientName) == rec["patient_name"]
        assert (
            ds.PatientBirthDate and ds.StudyDate and ds.AccessionNumber == rec["accession_number"]
        )
        assert f"/{rec['class']}/" in rec["path"] and rec["label"] == (rec["class"] == "positive")
        if ds.Modality == "DX":
            expected = "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
            assert ds.PresentationLUTShape == expected
        if rec["syntax"] in synth.LOSSY:
            assert ds.LossyImageCompression == "01"
    frontal = [r for r in records if r["view_position"] != "LL"]
    assert len(frontal) == 14
    assert sum(r["label"] for r in frontal) == 7  # balanced
    laterals = [r for r in records if r["view_position"] == "LL"]
    assert laterals, "lateral_fraction 0.3 over 14 studies should give at least one lateral"
    for lat in laterals:
        (front,) = [r for r in frontal if r["study_instance_uid"] == lat["study_instance_uid"]]
        assert lat["patient_id"] == front["patient_id"] and lat["label"] == front["label"]
        assert lat["series_instance_uid"] != front["series_instance_uid"]
        a, b = pydicom.dcmread(lat["path"]), pydicom.dcmread(front["path"])
        assert (a.StudyDate, a.AccessionNumber, a.PatientBirthDate) == (
            b.StudyDate,
            b.AccessionNumber,
            b.PatientBirthDate,
        )


def test_labels_csv_matches_the_files(corpus):
    out, records = corpus
    rows = synth.read_labels(out / "labels.csv")
    assert [r["sop_instance_uid"] for r in rows] == [r["sop_instance_uid"] for r in records]
    assert [int(r["label"]) for r in rows] == [r["label"] for r in records]
    with open(out / "labels.csv", newline="") as f:
        assert all(not r["path"].startswith("/") for r in csv.DictReader(f))  # relative paths
    assert len({r["sop_instance_uid"] for r in rows}) == len(rows)


def test_same_seed_same_corpus_other_seed_other_uids(tmp_path):
    a = synth.write_corpus(tmp_path / "a", 3, seed=11, size_range=(64, 80), syntaxes=["rle"])
    b = synth.write_corpus(tmp_path / "b", 3, seed=11, size_range=(64, 80), syntaxes=["rle"])
    c = synth.write_corpus(tmp_path / "c", 3, seed=12, size_range=(64, 80), syntaxes=["rle"])
    strip = [{k: v for k, v in r.items() if k != "path"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "path"} for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert np.array_equal(_pixels(ra["path"]), _pixels(rb["path"]))
    assert not {r["sop_instance_uid"] for r in a} & {r["sop_instance_uid"] for r in c}
    assert not {r["patient_id"] for r in a} & {r["patient_id"] for r in c}


@pytest.mark.parametrize("syntax", list(synth.SYNTAXES))
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_every_syntax_round_trips(tmp_path, syntax, photometric):
    bits = 8 if syntax in synth.EIGHT_BIT_ONLY else 13
    params = synth.ImageParams(rows=90, columns=70, bits_stored=bits, photometric=photometric)
    ref = synth.write_image(tmp_path / "ref.dcm", params, positive=True, seed=5)
    enc = synth.write_image(
        tmp_path / "enc.dcm", dataclasses.replace(params, syntax=syntax), positive=True, seed=5
    )
    ds = pydicom.dcmread(enc["path"])
    assert ds.file_meta.TransferSyntaxUID == synth.SYNTAXES[syntax]
    original, decoded = _pixels(ref["path"]), _pixels(enc["path"])
    assert decoded.shape == (90, 70)
    if syntax in synth.LOSSY:
        err = np.abs(decoded.astype(np.int64) - original.astype(np.int64))
        top = (1 << bits) - 1
        assert err.mean() < 0.03 * top and 0 < err.max() < 0.25 * top
    else:
        assert np.array_equal(decoded, original)


def test_signed_and_stray_high_bits(tmp_path):
    params = synth.ImageParams(rows=40, columns=30, bits_stored=12, signed=True)
    rec = synth.write_image(tmp_path / "s.dcm", params, positive=False, seed=2)
    ds = pydicom.dcmread(rec["path"])
    assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
    assert ds.pixel_array.min() < 0
    dirty = dataclasses.replace(params, signed=False, stray_high_bits=True)
    clean = dataclasses.replace(params, signed=False)
    a = synth.write_image(tmp_path / "d.dcm", dirty, positive=False, seed=2)
    b = synth.write_image(tmp_path / "c.dcm", clean, positive=False, seed=2)
    raw = np.frombuffer(pydicom.dcmread(a["path"]).PixelData, dtype="<u2")
    assert raw.max() >= 1 << 12  # garbage really is there
    assert np.array_equal(_pixels(a["path"]), _pixels(b["path"]))


def test_pixels_come_from_synthetic_image_with_the_label(tmp_path, monkeypatch):
    calls = []
    real = synth.synthetic_image

    def spy(rng, size, positive, *args, **kwargs):
        calls.append(positive)
        return real(rng, size, positive, *args, **kwargs)

    monkeypatch.setattr(synth, "synthetic_image", spy)
    records = synth.write_corpus(tmp_path, 4, seed=1, size_range=(64, 64), lateral_fraction=0)
    assert calls == [bool(r["label"]) for r in records]
    img = synth.radiograph(np.random.default_rng(0), 300, 260, positive=True)
    assert img.shape == (300, 260) and img.dtype == np.float32
    assert 0.0 <= img.min() < 0.3 and 0.7 < img.max() <= 1.0


def test_write_broken_and_unselected_list_their_files(tmp_path):
    broken = synth.write_broken(tmp_path / "b")
    assert set(broken) == {p.name for p in (tmp_path / "b").iterdir()}
    assert {"empty.dcm", "not_dicom.dcm", "truncated_pixel_data.dcm", "absurd_size.dcm"} <= set(
        broken
    )
    unselected = synth.write_unselected(tmp_path / "u")
    assert set(unselected) == {p.name for p in (tmp_path / "u").iterdir()}
    for name, keyword in unselected.items():
        ds = pydicom.dcmread(tmp_path / "u" / name)
        assert keyword in ds or keyword == "ViewPosition"
    assert pydicom.dcmread(tmp_path / "u" / "ct_chest.dcm").Modality == "CT"
    assert pydicom.dcmread(tmp_path / "u" / "lateral.dcm").ViewPosition == "LL"
    assert pydicom.dcmread(tmp_path / "u" / "multiframe.dcm").NumberOfFrames == 2
    assert pydicom.dcmread(tmp_path / "u" / "rgb.dcm").SamplesPerPixel == 3
