"""The file's content hash (``fingerprint.content_sha256``, the instances' ``content_sha256``):
native pixel data enters as its pixel fingerprint (no second pass over the pixels), every other
byte as it is; encapsulated, deflated and reduced-resolution files are hashed byte for byte."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from model.spec import PreprocessSpec
from tasks.dicom import fingerprint as fp
from tasks.dicom import synth
from tasks.dicom.discovery import SourceFile
from tasks.ingest import decode_item

SPEC = PreprocessSpec().to_dict()


def _dcmtk(tool: list[str], src: Path, dst: Path) -> Path:
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} (dcmtk) is missing: apt-get install dcmtk", pytrace=False)
    subprocess.run([*tool, str(src), str(dst)], check=True, capture_output=True)
    return dst


def _with_trailer(data: bytes, payload: bytes = b"\x00" * 8) -> bytes:
    """``data`` (explicit VR little endian) with Data Set Trailing Padding after Pixel Data."""
    return data + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, len(payload)) + payload


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("content-hash")
    params = synth.ImageParams(rows=420, columns=380, bits_stored=12, rescale=(1.0, -1024.0))
    original = Path(synth.write_image(root / "original.dcm", params, positive=True, seed=3)["path"])
    out = {"original": original}
    out["implicit"] = _dcmtk(["dcmconv", "+ti"], original, root / "implicit.dcm")
    out["big_endian"] = _dcmtk(["dcmconv", "+tb"], original, root / "big_endian.dcm")
    out["deflated"] = _dcmtk(["dcmconv", "+td"], original, root / "deflated.dcm")
    out["rle"] = _dcmtk(["dcmcrle"], original, root / "rle.dcm")
    ds = pydicom.dcmread(original)
    ds.compress(JPEG2000Lossless, ds.pixel_array, generate_instance_uid=False)
    out["j2k"] = root / "j2k.dcm"
    ds.save_as(out["j2k"], enforce_file_format=True)
    out["bare"] = root / "bare.dcm"  # no preamble, no file meta: an ACR-NEMA style data set
    ds = pydicom.dcmread(original)
    bare = ds.copy()
    bare.file_meta = pydicom.dataset.FileMetaDataset()
    bare.save_as(out["bare"], implicit_vr=True, little_endian=True)
    out["trailer"] = root / "trailer.dcm"
    out["trailer"].write_bytes(_with_trailer(original.read_bytes()))
    return out


def _decode(path: Path, data: bytes | None = None, **kw) -> tuple[str, str]:
    """(content_sha256, fingerprint) as the screening pipeline records them."""
    if data is not None:
        path = path.with_name(f"edited-{path.name}")
        path.write_bytes(data)
    dec = decode_item(SourceFile(uri=str(path), path=str(path)), "1.2.3", SPEC, **kw)
    assert dec.error is None, dec.error
    return dec.content_sha256, dec.pixel_fingerprint or dec.codestream_fingerprint


@pytest.mark.parametrize("name", ["original", "implicit", "big_endian", "bare", "trailer"])
def test_the_span_is_the_native_pixel_data_value(files, name):
    data = files[name].read_bytes()
    ds = pydicom.dcmread(files[name], force=True)
    syntax = ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)
    start, end = fp.native_span(ds, syntax)
    assert data[start:end] == ds.PixelData
    digest, pixels = _decode(files[name])
    assert pixels.startswith("px2:")
    assert digest == fp.content_sha256(data, pixels, (start, end))
    assert digest != hashlib.sha256(data).hexdigest()  # the pixels entered as their fingerprint


@pytest.mark.parametrize("name", ["deflated", "rle", "j2k"])
def test_other_files_are_hashed_byte_for_byte(files, name):
    ds = pydicom.dcmread(files[name])
    assert fp.native_span(ds, ds.file_meta.TransferSyntaxUID) is None
    expected = hashlib.sha256(files[name].read_bytes()).hexdigest()
    assert _decode(files[name], reduced=False)[0] == expected
    assert _decode(files[name], reduced=True)[0] == expected  # either decode, one hash


def test_a_copy_has_the_same_hash_and_any_change_another(files):
    data = files["original"].read_bytes()
    digest, pixels = _decode(files["original"])
    assert _decode(files["original"], data)[0] == digest  # the same bytes elsewhere
    ds = pydicom.dcmread(files["original"])
    start, _ = fp.native_span(ds, pydicom.uid.ExplicitVRLittleEndian)

    def changed(at: int) -> bytes:
        edited = bytearray(data)
        edited[at] ^= 0x01
        return bytes(edited)

    header_at = data.index(b"DICM") + 200  # a byte inside the file meta / header
    pixel_at = start + 2 * 1000  # the low byte of one stored value
    after_header = _decode(files["original"], changed(header_at))
    after_pixel = _decode(files["original"], changed(pixel_at))
    assert after_header[0] != digest
    assert after_pixel[0] != digest and after_pixel[1] != pixels
    trailer = files["trailer"].read_bytes()
    edited = trailer[:-1] + bytes([trailer[-1] ^ 0x01])  # the bytes after Pixel Data count too
    assert _decode(files["trailer"], edited)[0] != _decode(files["trailer"])[0]


def test_unused_high_bits_are_not_content(files):
    """The stated bound: bits above Bits Stored (12 here), which no reader uses, do not count."""
    data = files["original"].read_bytes()
    ds = pydicom.dcmread(files["original"])
    start, _ = fp.native_span(ds, pydicom.uid.ExplicitVRLittleEndian)
    edited = bytearray(data)
    edited[start + 1] |= 0x80  # bit 15 of the first stored value
    assert _decode(files["original"], bytes(edited)) == _decode(files["original"])


def test_a_span_outside_the_data_is_refused():
    with pytest.raises(ValueError, match="outside"):
        fp.content_sha256(b"1234", "px2:" + "0" * 32, (2, 9))
    plain = hashlib.sha256(b"1234").hexdigest()
    assert fp.content_sha256(b"1234", "cs1:" + "0" * 64, (0, 2)) == plain  # not a pixel one
