"""The pixel path against hostile and degenerate input: no free text in facts, every fact safe
for both databases, no NaN or infinity in the model input, blank and near-constant images
refused, LUT bit counts checked, codes read like the header scan."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

import tasks.dicom.pixels as px
from tasks.dicom.outcomes import InputError
from tests.tasks.dicom.test_pixels import SPEC, write

PLANTED = "ZEBULON^QUIXOTEPHI"


def storable(facts: dict) -> str:
    """The facts as the database gets them: strict JSON, no NUL, no control characters."""
    text = json.dumps(facts, allow_nan=False)
    assert "\\u0000" not in text and not any(ord(c) < 0x20 for c in text)
    return text


def voi_lut(descriptor: list[int], data: list[int], vr: str = "US") -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", vr, descriptor)
    item.LUTData = data
    return item


def test_lut_explanation_is_not_copied(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, window=False, bits_stored=12))
    item = voi_lut([4096, 0, 16], np.linspace(0, 65535, 4096).astype(int).tolist())
    item.LUTExplanation = PLANTED
    ds.VOILUTSequence = [item]
    res = px.preprocess(ds, SPEC)
    assert res.facts["window"]["source"] == "voi_lut"
    assert PLANTED not in storable(res.facts) and "explanation" not in res.facts["window"]


def test_control_characters_in_codes_reach_facts_escaped(tmp_path):
    ds = pydicom.dcmread(write(tmp_path))
    ds.VOILUTFunction = "LIN\x00EAR\x1b" + "X" * 500
    res = px.preprocess(ds, SPEC)
    rejected = res.facts["window_rejected"]
    assert rejected.startswith("(0028,1056) 'VOI LUT Function' value 'LIN\\x00EAR\\x1bXXX")
    assert len(rejected) < 200
    storable(res.facts)


def test_lower_case_photometric_is_read_as_the_header_scan_reads_it(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, photometric="MONOCHROME1"))
    upper = px.preprocess(ds, SPEC)
    ds.PhotometricInterpretation = "monochrome1 "
    lower = px.preprocess(ds, SPEC)
    assert ds.PhotometricInterpretation == "monochrome1 "  # the caller's data set is left alone
    assert lower.facts["photometric"] == "MONOCHROME1" and lower.facts["inverted"] is True
    np.testing.assert_array_equal(lower.image, upper.image)
    assert lower.fingerprint == upper.fingerprint
    ds.PhotometricInterpretation = "rgb"
    with pytest.raises(InputError, match=r"'Photometric Interpretation' value 'RGB' with"):
        px.preprocess(ds, SPEC)


# -- NaN and infinity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("descriptor", "vr", "rule"),
    [
        ([4096, 0, 0], "US", "declares 0 bits per entry; it must be between 8 and 16"),
        ([4096, 0, -3], "SS", "declares -3 bits per entry; it must be between 8 and 16"),
        ([4096, 0, 17], "US", "declares 17 bits per entry"),
        ([-5, 0, 16], "SS", "declares -5 entries"),
        ([4096, 0], "US", "has 2 values; it must have 3"),
    ],
)
def test_a_broken_voi_lut_is_rejected_for_the_window_with_its_reason(
    tmp_path, descriptor, vr, rule
):
    """Before: 0 bits gave a NaN model input, -3 'ValueError: negative shift count'."""
    ds = pydicom.dcmread(write(tmp_path, bits_stored=12))
    ds.VOILUTSequence = [voi_lut(descriptor, [0] * 4096, vr)]
    res = px.preprocess(ds, SPEC)
    assert np.isfinite(res.image).all()
    assert res.facts["window"]["source"] == "window"  # the next VOI the policy allows
    rejected = res.facts["window_rejected"]
    assert rejected.startswith("(0028,3010) 'VOI LUT Sequence' item 1 (0028,3002) 'LUT Descriptor'")
    assert rule in rejected


def test_a_broken_modality_lut_fails_the_file(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, bits_stored=12))
    ds.ModalityLUTSequence = [voi_lut([4096, 0, 0], list(range(4096)))]
    with pytest.raises(InputError) as info:
        px.preprocess(ds, SPEC)
    assert str(info.value) == (
        "(0028,3000) 'Modality LUT Sequence' item 1 (0028,3002) 'LUT Descriptor' declares 0 "
        "bits per entry; it must be between 8 and 16"
    )


def test_a_rescale_that_overflows_fails_the_file(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, window=False, bits_stored=12))
    ds.RescaleSlope = "1e308"
    with pytest.raises(InputError) as info:
        px.preprocess(ds, SPEC)
    assert str(info.value).startswith(
        "(0028,1053) 'Rescale Slope' / (0028,1052) 'Rescale Intercept' maps stored values to "
        "NaN or infinite values"
    )


# -- blank and nearly constant images -------------------------------------------------------------


def test_a_blank_image_fails(tmp_path):
    ds = pydicom.dcmread(write(tmp_path))
    ds.PixelData = np.full((ds.Rows, ds.Columns), 700, dtype=np.uint16).tobytes()
    with pytest.raises(InputError) as info:
        px.preprocess(ds, SPEC)
    assert str(info.value) == (
        "the image is blank: every pixel of (7FE0,0010) 'Pixel Data' holds the stored value 700"
    )
    ds.Rows = ds.Columns = 1  # the 1 x 1 image, should it get past the selection policy
    ds.PixelData = np.array([5], dtype=np.uint16).tobytes() + b"\0\0"
    with pytest.raises(InputError, match="the image is blank"):
        px.preprocess(ds, SPEC)


def test_noise_without_an_image_fails(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, window=False))
    rng = np.random.default_rng(0)
    flat = 2000 + rng.integers(-1, 2, size=(ds.Rows, ds.Columns))
    ds.PixelData = flat.astype(np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    with pytest.raises(InputError) as info:
        px.preprocess(ds, SPEC)
    assert str(info.value).startswith(
        "the image is nearly constant after (0028,1050) 'Window Center' / (0028,1051) 'Window "
        "Width' 2000 / 3000 (LINEAR): 98% of its pixels span 0.1% of the display range"
    )


def test_a_window_that_saturates_the_whole_image_fails(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, bits_stored=12))
    ds.WindowCenter, ds.WindowWidth = 20000, 100  # far above every stored value: all black
    with pytest.raises(InputError, match=r"nearly constant after \(0028,1050\) 'Window Center'"):
        px.preprocess(ds, SPEC)
    del ds.WindowCenter, ds.WindowWidth  # the percentile window of the same image is fine
    assert px.preprocess(ds, SPEC).facts["window"]["source"] == "percentile"


def test_mostly_padding_is_still_an_image(tmp_path):
    """Collimation borders and padding are common: only the pixels outside Pixel Padding
    count, and a small exposed field is enough."""
    ds = pydicom.dcmread(write(tmp_path, window=False, bits_stored=12))
    arr = ds.pixel_array.copy()
    arr[:, 30:] = 0
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 0
    res = px.preprocess(ds, SPEC)
    assert res.facts["window"]["padding_excluded"] == [0, 0]


def test_real_windowed_images_are_far_from_the_limit(tmp_path):
    spreads = []
    for seed, photometric in enumerate(("MONOCHROME1", "MONOCHROME2")):
        ds = pydicom.dcmread(write(tmp_path, f"{seed}.dcm", seed=seed, photometric=photometric))
        layout, _ = px.check_image(ds, ds.file_meta.TransferSyntaxUID, px.DEFAULT_MAX_PIXELS)
        stats = px.StoredValues(ds.pixel_array, layout)
        modality = px.modality_transform(ds, layout)
        voi = px.voi_transform(ds, SPEC, modality, stats)
        table = px.display_table(stats, modality, voi, photometric == "MONOCHROME1")
        order = np.argsort(table)
        lo, hi = px.weighted_percentiles(table[order], stats.counts[order], (1.0, 99.0))
        spreads.append(hi - lo)
    assert min(spreads) > 10 * px.MIN_DISPLAY_SPREAD, spreads
