"""The one tag formatter: every message of tasks.dicom names an attribute the same way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

import tasks.dicom.pixels as px
from model.spec import PreprocessSpec
from tasks.dicom.discovery import discover
from tasks.dicom.headers import read_header
from tasks.dicom.outcomes import InputError
from tasks.dicom.tags import UNKNOWN_NAME, label, labels, tag_id, tag_name

PACKAGE = Path(px.__file__).parent
HAND_WRITTEN_TAG = re.compile(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)")


def test_label_from_keyword_number_and_pair():
    expected = "(0028,0101) 'Bits Stored'"
    assert label("BitsStored") == expected
    assert label(0x00280101) == expected
    assert label((0x0028, 0x0101)) == expected
    assert tag_id("WindowCenter") == "(0028,1050)"
    assert tag_name("SamplesPerPixel") == "Samples per Pixel"
    assert label("PixelData") == "(7FE0,0010) 'Pixel Data'"  # upper-case hex


def test_private_and_unknown_tags_are_named_as_such():
    assert label(0x00091010) == f"(0009,1010) '{UNKNOWN_NAME}'"
    assert tag_name(0x7FE10010) == UNKNOWN_NAME


def test_labels_join_in_order():
    assert labels(["SOPInstanceUID", "StudyInstanceUID"], " or ") == (
        "(0008,0018) 'SOP Instance UID' or (0020,000D) 'Study Instance UID'"
    )


def test_an_unknown_keyword_is_a_programming_error():
    with pytest.raises(ValueError):
        label("NoSuchKeyword")


def test_header_scan_and_pixel_path_name_the_same_tag_the_same_way():
    # badVR.dcm: (0028,0008) Number of Frames is '1A'; both stages refuse it
    path = get_testdata_file("badVR.dcm")
    with pytest.raises(InputError) as header_error:
        read_header(next(iter(discover([path]))), b"key")
    with pytest.raises(InputError) as pixel_error:
        px.preprocess(path, PreprocessSpec())
    for error in (header_error, pixel_error):
        assert label("NumberOfFrames") in str(error.value)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module other than docstrings (and comments, which ast drops)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_module_writes_a_tag_by_hand():
    # synth writes DICOM files (its own literals are test data); the formatter itself is exempt
    modules = [p for p in PACKAGE.glob("*.py") if p.name not in ("synth.py", "tags.py")]
    modules += list(PACKAGE.glob("decoders/*.py"))
    assert len(modules) >= 8
    found = [
        f"{p.name}:{line}: {text!r}"
        for p in modules
        for line, text in _code_strings(p)
        if HAND_WRITTEN_TAG.search(text)
    ]
    assert not found, "format tags with tasks.dicom.tags.label:\n" + "\n".join(found)
