"""Content fingerprints with copies made by real encoders (dcmtk, OpenJPEG through pydicom):
every lossless copy of an instance has its fingerprint, a lossy copy does not, and a copy decoded
at reduced resolution is matched by a full decode on demand."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

import tasks.dicom.pixels as px
from model.spec import PreprocessSpec
from tasks.dicom import fingerprint as fp
from tasks.dicom import identity, synth

SPEC = PreprocessSpec()

LOSSLESS = {
    "implicit": ["dcmconv", "+ti"],
    "explicit_big_endian": ["dcmconv", "+tb"],
    "jpeg_ls": ["dcmcjpls"],  # JPEG-LS lossless (default)
    "jpeg_lossless_sv1": ["dcmcjpeg", "+e1"],
    "jpeg_lossless": ["dcmcjpeg", "+el"],
    "rle": ["dcmcrle"],
}
LOSSY = {  # +un: keep the SOP Instance UID, as a careless archive would
    "jpeg_ls_near_lossless": ["dcmcjpls", "+en", "+md", "2", "+un"],
    "jpeg_extended_12bit": ["dcmcjpeg", "+ee", "+un"],
}


def _run(tool: list[str], src: Path, dst: Path) -> None:
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} (dcmtk) is missing: apt-get install dcmtk", pytrace=False)
    subprocess.run([*tool, str(src), str(dst)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, Path]:
    """One 12-bit chest DX (700 x 640, rescale and window) and its copies."""
    root = tmp_path_factory.mktemp("fingerprint")
    params = synth.ImageParams(rows=700, columns=640, bits_stored=12, rescale=(2.0, -1024.0))
    original = Path(synth.write_image(root / "original.dcm", params, positive=True, seed=5)["path"])
    out = {"original": original}
    for name, tool in {**LOSSLESS, **LOSSY}.items():
        out[name] = root / f"{name}.dcm"
        _run(tool, original, out[name])
    ds = pydicom.dcmread(original)
    ds.compress(JPEG2000Lossless, ds.pixel_array, generate_instance_uid=False)
    out["j2k_lossless"] = root / "j2k_lossless.dcm"
    ds.save_as(out["j2k_lossless"], enforce_file_format=True)
    return out


def test_copies_are_the_same_instance_in_other_bytes(copies):
    uids = {name: str(pydicom.dcmread(p).SOPInstanceUID) for name, p in copies.items()}
    assert len(set(uids.values())) == 1, uids
    syntaxes = {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in copies.values()}
    assert len(syntaxes) == len(copies)  # every copy is another encoding
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in copies.values()}
    assert len(digests) == len(copies)  # which a hash of the file's bytes calls a conflict


def test_lossless_copies_share_the_pixel_fingerprint(copies):
    original = px.preprocess(copies["original"], SPEC)
    assert original.fingerprint.startswith("px2:") and len(original.fingerprint) == 36
    for name in LOSSLESS:
        res = px.preprocess(copies[name], SPEC)
        assert res.fingerprint == original.fingerprint, (name, res.facts["decoder"])
        assert identity.pixel_fingerprint(copies[name]) == original.fingerprint


def test_lossy_copies_do_not(copies):
    original = px.preprocess(copies["original"], SPEC).fingerprint
    for name in LOSSY:
        res = px.preprocess(copies[name], SPEC)
        assert fp.kind(res.fingerprint) == "px2"  # decoded at full resolution
        assert res.fingerprint != original, name
        assert identity.compare(original, res.fingerprint) == identity.Comparison(
            False, "different pixel values"
        )


def test_reduced_decode_gives_a_codestream_fingerprint_and_a_full_one_on_demand(copies):
    original = px.preprocess(copies["original"], SPEC).fingerprint
    j2k = copies["j2k_lossless"]
    reduced = px.preprocess(j2k, SPEC)
    assert reduced.facts["reduce_level"] >= 1
    assert fp.kind(reduced.fingerprint) == "cs1"
    assert identity.codestream_fingerprint(j2k) == reduced.fingerprint
    assert identity.codestream_fingerprint(copies["original"]) is None  # native: no codestream
    full = px.preprocess(j2k, SPEC, reduced=False)
    assert full.fingerprint == original == identity.pixel_fingerprint(j2k)
    # the writer's comparison, both ways round
    assert identity.compare(original, reduced.fingerprint, new_source=j2k) == identity.Comparison(
        True, "full-resolution decode of the new file"
    )
    unknown = identity.compare(reduced.fingerprint, original)
    assert unknown.same is None and "not at hand" in unknown.how
    assert identity.compare(reduced.fingerprint, original, stored_source=j2k).same is True
    lossy = px.preprocess(copies["jpeg_ls_near_lossless"], SPEC).fingerprint
    assert identity.compare(reduced.fingerprint, lossy, stored_source=j2k).same is False
    assert identity.compare(original, reduced.fingerprint).same is None  # no source: cannot tell


def test_the_codestream_fingerprint_ignores_the_wrapper(copies, tmp_path):
    ds = pydicom.dcmread(copies["j2k_lossless"])
    ds.PatientName = "OTHER^NAME"
    ds.InstitutionName = "another export"
    ds.save_as(tmp_path / "rewrapped.dcm", enforce_file_format=True)
    assert identity.codestream_fingerprint(
        tmp_path / "rewrapped.dcm"
    ) == identity.codestream_fingerprint(copies["j2k_lossless"])
    stored = px.preprocess(copies["j2k_lossless"], SPEC).fingerprint
    new = px.preprocess(tmp_path / "rewrapped.dcm", SPEC).fingerprint
    assert identity.compare(stored, new) == identity.Comparison(True, "same fingerprint")
    # a native copy is matched through its codestream when it is encapsulated the same way,
    # and through a full decode of the stored file otherwise
    native = px.preprocess(copies["original"], SPEC).fingerprint
    assert identity.compare(stored, native, new_source=copies["original"]).same is None


def test_two_codestreams_of_the_same_pixels_are_told_apart_only_by_decoding(copies, tmp_path):
    """Another JPEG 2000 encoder writes other bytes for the same values: here the same
    codestream with a comment marker segment (COM) after SIZ, which decoders skip."""
    j2k = copies["j2k_lossless"]
    ds = pydicom.dcmread(j2k)
    cs = fp.frame_bytes(ds)
    assert cs[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ
    at = 4 + struct.unpack(">H", cs[4:6])[0]
    text = b"another encoder"
    other = cs[:at] + b"\xff\x64" + struct.pack(">HH", 4 + len(text), 1) + text + cs[at:]
    ds.PixelData = encapsulate([other + b"\0" * (len(other) % 2)])
    ds.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    stored = px.preprocess(j2k, SPEC).fingerprint
    new = px.preprocess(tmp_path / "other.dcm", SPEC)
    assert new.facts["reduce_level"] >= 1 and fp.kind(new.fingerprint) == "cs1"
    assert new.fingerprint != stored
    assert identity.compare(stored, new.fingerprint, new_source=tmp_path / "other.dcm").same is None
    both = identity.compare(
        stored, new.fingerprint, new_source=tmp_path / "other.dcm", stored_source=j2k
    )
    assert both == identity.Comparison(True, "full-resolution decode of both files")
    lossy = copies["jpeg_ls_near_lossless"]
    assert (
        identity.compare(stored, new.fingerprint, new_source=lossy, stored_source=j2k).same is False
    )


@pytest.mark.parametrize(
    ("change", "same"),
    [
        (lambda ds: setattr(ds, "PatientName", "SOMEONE^ELSE"), True),
        (lambda ds: setattr(ds, "LUTExplanation", "free text"), True),
        (lambda ds: setattr(ds, "RescaleSlope", "2.0"), True),  # the same number, other text
        (lambda ds: setattr(ds, "PhotometricInterpretation", "monochrome2"), True),
        (lambda ds: setattr(ds, "RescaleIntercept", "-1000"), False),
        (lambda ds: setattr(ds, "WindowWidth", float(ds.WindowWidth) + 1), False),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"), False),
        (lambda ds: setattr(ds, "PresentationLUTShape", "INVERSE"), False),
        (lambda ds: setattr(ds, "PixelPaddingValue", 0), False),
        (lambda ds: setattr(ds, "BitsStored", 13), False),
    ],
)
def test_what_changes_the_meaning_changes_the_fingerprint(copies, change, same):
    ds = pydicom.dcmread(copies["original"])
    before = px.preprocess(ds, SPEC).fingerprint
    change(ds)
    after = px.preprocess(ds, SPEC).fingerprint
    assert (after == before) is same


def test_lut_data_is_hashed_whatever_its_vr(copies):
    from pydicom.dataset import Dataset

    fingerprints = set()
    data = np.linspace(0, 65535, 4096).astype(np.uint16)
    for vr, value in (("US", data.tolist()), ("OW", data.astype("<u2").tobytes())):
        ds = pydicom.dcmread(copies["original"])
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.add_new("LUTData", vr, value)
        ds.VOILUTSequence = [item]
        fingerprints.add(px.preprocess(ds, SPEC).fingerprint)
    assert len(fingerprints) == 1
    ds.VOILUTSequence[0].LUTData = data[::-1].astype("<u2").tobytes()
    assert px.preprocess(ds, SPEC).fingerprint not in fingerprints


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # chest CR, JPEG 2000 lossless vs uncompressed
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("MR_small_implicit.dcm", "MR_small.dcm"),
    ],
)
def test_real_lossless_pairs(a, b):
    pa, pb = get_testdata_file(a), get_testdata_file(b)
    assert identity.pixel_fingerprint(pa) == identity.pixel_fingerprint(pb)


def test_kind_refuses_anything_else():
    assert fp.kind("px1:" + "0" * 64) == "px1"
    assert fp.kind("px2:" + "0" * 32) == "px2"
    for bad in ("", "px1", "sha256:" + "0" * 64, "px1:abc", "cs2:" + "0" * 64, "px2:" + "0" * 64):
        with pytest.raises(ValueError, match="not a content fingerprint"):
            fp.kind(bad)
    legacy = hashlib.sha256(b"the file's bytes").hexdigest()  # what earlier versions stored
    assert identity.compare(legacy, "px1:" + "0" * 64) == identity.Comparison(
        None, "the stored value is not a content fingerprint"
    )
    with pytest.raises(ValueError):
        identity.compare("px1:" + "0" * 64, legacy)


def test_sha256_pixel_fingerprints_of_earlier_versions_still_compare(copies):
    """``px1`` (SHA-256, what versions before 2026-11-29 stored) and ``px2`` (XXH3-128) hash the
    same input: the pixel path computes ``px1`` when asked, and ``compare`` converts."""
    original, j2k = copies["original"], copies["j2k_lossless"]
    stored_px1 = px.preprocess(original, SPEC, pixel_kind="px1").fingerprint
    assert fp.kind(stored_px1) == "px1" and len(stored_px1) == 68
    for name in LOSSLESS:  # every lossless copy gets the same px1 when asked for it
        assert px.preprocess(copies[name], SPEC, pixel_kind="px1").fingerprint == stored_px1
    assert identity.pixel_fingerprint(j2k, "px1") == stored_px1
    new_px2 = px.preprocess(copies["implicit"], SPEC).fingerprint
    assert fp.kind(new_px2) == "px2"
    same = identity.compare(stored_px1, new_px2, new_source=copies["implicit"])
    assert same == identity.Comparison(True, "the new file's px1 fingerprint")
    assert identity.compare(stored_px1, new_px2, stored_source=original).same is True
    lossy = copies["jpeg_ls_near_lossless"]
    lossy_px2 = px.preprocess(lossy, SPEC).fingerprint
    assert identity.compare(stored_px1, lossy_px2, new_source=lossy).same is False
    unknown = identity.compare(stored_px1, new_px2)
    assert unknown.same is None and "neither file" in unknown.how
    reduced = px.preprocess(j2k, SPEC).fingerprint  # cs1 against a stored px1: a full decode
    assert identity.compare(stored_px1, reduced, new_source=j2k).same is True
    with pytest.raises(ValueError, match="not a pixel fingerprint kind"):
        px.preprocess(original, SPEC, pixel_kind="cs1")


def test_px2_is_xxh3_of_what_px1_hashes():
    """``px2`` is XXH3-128 of the very input ``px1`` hashes with SHA-256 (the kind's name, the
    meaning attributes, the stored values); its speed is measured by the benchmarks."""
    import xxhash

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    layout, photometric = px.check_image(ds, ds.file_meta.TransferSyntaxUID, px.DEFAULT_MAX_PIXELS)
    stored = ds.pixel_array
    expected = xxhash.xxh3_128()
    meaning = fp.json.dumps(
        fp.meaning(ds, layout, photometric), sort_keys=True, separators=(",", ":")
    )
    expected.update(b"px2\n" + meaning.encode() + b"\n")
    expected.update(np.ascontiguousarray(stored, dtype=layout.stored_dtype().newbyteorder("<")))
    assert fp.of_pixels(ds, layout, photometric, stored) == f"px2:{expected.hexdigest()}"
