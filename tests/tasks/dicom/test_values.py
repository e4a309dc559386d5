"""Shared value rules: safe strings, codes, UID grammar, image shape; and the header scan and the
selection policy applying them to hostile header values."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.spec import PreprocessSpec
from tasks.dicom import values
from tasks.dicom.discovery import discover
from tasks.dicom.headers import read_header
from tasks.dicom.outcomes import InputError
from tasks.dicom.pixels import preprocess
from tasks.dicom.selection import SelectionPolicy, select
from tests.tasks.dicom.test_headers import write_dicom

KEY = b"k"
HOSTILE = "1.2.3.ZEBULON^QUIXOTEPHI"


def header(path: Path):
    (entry,) = discover([path])
    return read_header(entry, KEY)


def db_safe(text: str) -> bool:
    """What both databases accept in a text column: no NUL, encodable as UTF-8; and nothing
    that can forge a line."""
    text.encode("utf-8")
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


# -- the rules ------------------------------------------------------------------------------------


def test_safe_text_escapes_controls_and_caps():
    assert values.safe_text("ACC\x00NUL\n\x1b[31m") == "ACC\\x00NUL\\x0a\\x1b[31m"
    assert values.safe_text("a\ud800b\x85") == "a\\ud800b\\x85"
    assert values.safe_text("x" * 100, 10) == "x" * 9 + "…"
    assert values.safe_text("Ünïcode ok") == "Ünïcode ok"


@given(st.text())
def test_safe_text_is_always_storable(text):
    out = values.safe_text(text, 50)
    assert db_safe(out) and len(out) <= 50


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=10,
    )
)
def test_safe_json_is_storable_json(value):
    text = json.dumps(values.safe_json(value), allow_nan=False)  # NaN/inf would raise here
    assert "\\u0000" not in text
    json.loads(text)


def test_code_reads_like_the_header_scan():
    assert values.code(" monochrome2\x00") == "MONOCHROME2"
    assert values.code(b"cr ") == "CR"
    assert values.code(["a", "b"]) == "A\\B"
    assert values.code("  ") is None and values.code(None) is None


def test_redact_pydicom_messages():
    long = "Invalid value for VR UI: '1.2.3.Z^Q'. Please see <x> for allowed values for each VR."
    assert values.redact(long) == "Invalid value for VR UI (value not shown)"
    assert values.redact("Invalid value for VR DA: 'SMITH^JOHN'.") == (
        "Invalid value for VR DA (value not shown)"
    )
    assert values.redact('Value "SMITH" is not valid for elements with a VR of IS') == (
        "A value is not valid for elements with a VR of IS"
    )
    assert values.redact("Expected explicit VR, but found implicit VR") == (
        "Expected explicit VR, but found implicit VR"
    )


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("1.2.840.10008.1.2", None),
        ("0", None),
        ("1.2.03", None),  # leading zero: noted, not refused
        (HOSTILE, "characters other than digits and dots"),
        ("1.2." + "3" * 70, "is 74 characters long; a UID has at most 64"),
        ("1..2", "empty component"),
        (".1.2", "empty component"),
        ("1.2.", "empty component"),
        ("1.2 3", "characters other than digits and dots"),
        ("", "empty"),
    ],
)
def test_uid_grammar(uid, problem):
    found = values.uid_problem(uid)
    assert (found is None) if problem is None else (problem in found)
    if found:
        assert uid not in found or not uid  # the value is never quoted
    assert values.uid_has_leading_zero(uid) == (uid == "1.2.03")


@pytest.mark.parametrize(
    ("rows", "columns", "problem"),
    [
        (1, 1, "1 x 1: a side under 32 px"),
        (1, 5000, "1 x 5000: a side under 32 px"),
        (4000, 1, "4000 x 1: a side under 32 px"),
        (31, 40, "a side under 32 px"),
        (32, 129, "an aspect ratio of 4.0:1 is above 4:1"),
        (600, 100, "an aspect ratio of 6.0:1 is above 4:1"),
        (32, 128, None),
        (64, 48, None),
        (3000, 2500, None),
    ],
)
def test_shape_rule(rows, columns, problem):
    found = values.shape_problem(rows, columns)
    assert (found is None) if problem is None else (problem in found)
    if found:
        assert found.startswith("(0028,0010) 'Rows' x (0028,0011) 'Columns'")


# -- the header scan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keyword",
    ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
)
def test_a_name_in_a_uid_fails_the_file_without_being_quoted(tmp_path, keyword):
    with pytest.raises(InputError) as info:
        header(write_dicom(tmp_path / "x.dcm", **{keyword: HOSTILE}))
    reason = str(info.value)
    assert "is not a valid UID" in reason and "ZEBULON" not in reason and "1.2.3" not in reason
    tag = {"StudyInstanceUID": "(0020,000D)", "SeriesInstanceUID": "(0020,000E)"}
    tag |= {"SOPInstanceUID": "(0008,0018)", "SOPClassUID": "(0008,0016)"}
    assert reason.startswith(f"A {tag[keyword]} ")


def test_a_name_in_the_transfer_syntax_fails_the_file(tmp_path, caplog):
    path = write_dicom(tmp_path / "x.dcm")
    data = path.read_bytes()
    syntax = b"1.2.840.10008.1.2.1\x00"
    assert data.count(syntax) == 1
    path.write_bytes(data.replace(syntax, b"1.2.ZEBULON^QUIXOTE\x00"))  # same length
    # at the pydicom logger itself: the CLI's quiet_console (cli/console.py) raises its level
    # in-process, and earlier tests in the same run call it
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        with pytest.raises(InputError, match=r"^A \(0002,0010\) 'Transfer Syntax UID' value is"):
            header(path)
        with pytest.raises(InputError) as info:  # the pixel path, reached without a header scan
            preprocess(path, PreprocessSpec())
    assert "ZEBULON" not in str(info.value)
    # pydicom logged the invalid value while reading the file meta: the filter removed it
    logged = [r.getMessage() for r in caplog.records if r.name == "pydicom"]
    assert any("Invalid value for VR UI (value not shown)" in m for m in logged), logged
    assert not any("ZEBULON" in m for m in logged)


def test_hostile_strings_are_stored_safely(tmp_path):
    path = write_dicom(
        tmp_path / "x.dcm",
        AccessionNumber="ACC\x00NUL\x01",
        Modality="c\x00r",
        BodyPartExamined="CHEST" + "X" * 200,
        ViewPosition="P\x1bA",
        PresentationIntentType="for\tpresentation",
    )
    h = header(path)
    assert h.accession_number == "ACC\\x00NUL\\x01"
    assert h.modality == "C\\x00R"
    assert len(h.body_part_examined) == values.CODE_CAP and h.body_part_examined.endswith("…")
    assert h.view_position == "P\\x1bA"
    assert h.presentation_intent == "FOR\\x09PRESENTATION"
    for value in h.to_dict().values():
        if isinstance(value, str):
            assert db_safe(value) and len(value) <= 300
    # and the reason selection gives quotes the escaped, capped value
    reason = select(h)
    assert reason == "Modality 'C\\x00R' is not one of CR, DX" and db_safe(reason)


def test_selection_and_pixel_path_read_photometric_alike(tmp_path):
    h = header(write_dicom(tmp_path / "x.dcm", PhotometricInterpretation="monochrome2 "))
    assert h.photometric_interpretation == "MONOCHROME2" and select(h) is None


# -- the selection policy: shapes -----------------------------------------------------------------


@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (1, 5000), (4000, 1), (3000, 600)])
def test_degenerate_shapes_are_skipped(tmp_path, rows, columns):
    h = header(write_dicom(tmp_path / "x.dcm", Rows=rows, Columns=columns))
    reason = select(h)
    assert reason is not None and reason.startswith("(0028,0010) 'Rows' x (0028,0011) 'Columns'")
    assert "not a radiograph" in reason


def test_shape_limits_can_be_stricter_not_looser(tmp_path):
    h = header(write_dicom(tmp_path / "x.dcm", Rows=100, Columns=240))
    assert select(h) is None
    strict = SelectionPolicy(min_side=128, max_aspect_ratio=2)
    assert "a side under 128 px" in select(h, strict)
    assert "above 2:1" in select(header(write_dicom(tmp_path / "y.dcm", Rows=300)), strict)
    assert SelectionPolicy.from_dict(strict.to_dict()) == strict
    with pytest.raises(ValueError, match="min_side should be at least 32"):
        SelectionPolicy(min_side=8)
    with pytest.raises(ValueError, match="max_aspect_ratio should be between 1 and 4"):
        SelectionPolicy(max_aspect_ratio=10)
    with pytest.raises(ValueError, match="min_side should be an integer"):
        SelectionPolicy(min_side=True)


# -- generated hostile values through header scan, selection and pixel path ------------------------

TEXT_KEYWORDS = (
    "AccessionNumber",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "PresentationIntentType",
    "SeriesDescription",
    "VOILUTFunction",
    "PresentationLUTShape",
    "StudyDate",
    "StudyInstanceUID",
    "SOPClassUID",
)
NUMBER_KEYWORDS = ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept")
HOSTILE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FF), max_size=300
) | st.sampled_from(["ACC\x00NUL", "\x00", "monochrome1", " CR ", "1.2.3.ZEBULON^Q", "x" * 5000])
HOSTILE_NUMBER = st.sampled_from(
    ["nan", "inf", "-inf", "1e308", "-1e308", "1e999", "0", "-0", "1e-320", "abc", "1\\2\\3", ""]
) | st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x)[:16])


def _hostile_file(tmp: Path, keyword: str, value: str) -> bytes | None:
    import warnings

    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import DataElement
    from pydicom.tag import Tag

    from tasks.dicom import synth

    ds, _ = synth._small_dataset(7)
    raw = value.encode("latin-1", "replace")
    if len(raw) % 2:
        raw += b" "
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add(DataElement(Tag(keyword), dictionary_VR(keyword), ""))  # placeholder
        data = synth._bytes_of(ds)
    # write the value's bytes in place of the empty placeholder: no validation on the way
    tag = Tag(keyword)
    head = tag.group.to_bytes(2, "little") + tag.element.to_bytes(2, "little")
    head += dictionary_VR(keyword).encode()
    at = data.find(head + b"\x00\x00")
    if at < 0 or len(raw) > 0xFFFF:
        return None
    return data[: at + 6] + len(raw).to_bytes(2, "little") + raw + data[at + 8 :]


@given(
    st.one_of(
        st.tuples(st.sampled_from(TEXT_KEYWORDS), HOSTILE_TEXT),
        st.tuples(st.sampled_from(NUMBER_KEYWORDS), HOSTILE_NUMBER),
    )
)
def test_hostile_values_end_in_an_outcome_and_storable_strings(tmp_path_factory, case):
    """Whatever one header value holds: the header scan, the selection policy and the pixel
    path end in a header or a reason (no other exception), and every string they keep is
    storable in both databases; a planted name in a UID or free text is never kept."""
    from model.spec import PreprocessSpec
    from tasks.dicom.discovery import SourceFile
    from tasks.dicom.outcomes import SkipReason

    keyword, value = case
    # codes and numbers may be quoted (escaped, capped); text, dates and UIDs never are
    never_quoted = keyword in ("StudyDate", "StudyInstanceUID", "SOPClassUID", "SeriesDescription")
    planted = "ZEBULON" if never_quoted else "\x00"
    data = _hostile_file(tmp_path_factory.getbasetemp(), keyword, value)
    if data is None:
        return
    src = SourceFile(uri="mem://x.dcm", path="", container="inline", data=data, size=len(data))
    try:
        h = read_header(src, KEY)
    except (InputError, SkipReason) as exc:
        assert db_safe(str(exc)) and planted not in str(exc)
        return
    for field_value in h.to_dict().values():
        if isinstance(field_value, str):
            assert db_safe(field_value) and len(field_value) <= 300
    reason = select(h)
    if reason is not None:
        assert db_safe(reason) and len(reason) <= 400 and planted not in reason
        return
    try:
        res = preprocess(data, PreprocessSpec())
    except InputError as exc:
        assert db_safe(str(exc)) and len(str(exc)) <= 1000 and planted not in str(exc)
        return
    text = json.dumps(res.facts, allow_nan=False)
    assert "\\u0000" not in text and planted not in text
    assert np.isfinite(res.image).all() and res.fingerprint.startswith(("px2:", "cs1:"))
