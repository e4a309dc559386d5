"""``parse_bytes``: one parse of a file for the header scan and the pixel path.

It must give exactly what ``read_header`` gives (the header, or the same error) and the data
set ``pydicom.dcmread`` gives, for every file pydicom ships and every broken file we generate.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from tasks.dicom.discovery import SourceFile
from tasks.dicom.headers import parse_bytes, read_header
from tasks.dicom.outcomes import InputError, SkipReason
from tasks.dicom.synth import write_broken, write_unselected

KEY = b"parse-bytes-key"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("broken")
    write_broken(root / "broken")
    write_unselected(root / "unselected")
    ours = sorted(p for p in root.rglob("*") if p.is_file())
    shipped = [Path(p) for p in get_testdata_files("*") if Path(p).is_file()]
    shipped = [p for p in shipped if p.suffix not in (".py", ".pyc", ".json", ".txt")]
    return ours + sorted(shipped)


def outcome(read):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read()
    except (InputError, SkipReason) as exc:
        return f"{type(exc).__name__}: {exc}"


def test_the_header_and_its_errors_equal_read_headers(files) -> None:
    seen = {"headers": 0, "errors": 0}
    for path in files:
        src = SourceFile(uri=str(path), path=str(path), size=path.stat().st_size)
        expected = outcome(lambda src=src: read_header(src, KEY))
        got = outcome(lambda p=path: parse_bytes(str(p), p.read_bytes(), KEY)[0])
        assert got == expected, path.name
        seen["errors" if isinstance(expected, str) else "headers"] += 1
    assert seen["headers"] > 100 and seen["errors"] > 20  # both kinds were compared


def test_the_data_set_equals_dcmreads(files) -> None:
    compared = 0
    for path in files:
        data = path.read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, ds, _ = parse_bytes(str(path), data, KEY)
                expected = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception:  # either cannot read it: nothing to compare
            continue
        if ds is None:
            continue
        assert ds.file_meta == expected.file_meta, path.name
        assert ds == expected, path.name
        if "PixelData" in expected:
            assert ds["PixelData"].value == expected["PixelData"].value
        compared += 1
    assert compared > 100
