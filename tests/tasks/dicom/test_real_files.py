"""The pixel path on real files shipped by pydicom and pydicom-data (``data_store``)."""

from __future__ import annotations

import functools

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

import tasks.dicom.pixels as px
from model.spec import PreprocessSpec
from tasks.dicom import decoders
from tasks.dicom.outcomes import InputError

SPEC = PreprocessSpec()


def real(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} not found: is pydicom-data (data_store) installed?"
    return path


@functools.cache
def full(name: str) -> px.Preprocessed:
    return px.preprocess(real(name), SPEC, reduced=False)


def unit(res: px.Preprocessed) -> np.ndarray:
    return res.image[0] * SPEC.std[0] + SPEC.mean[0]


def stored(name: str) -> np.ndarray:
    """Full-resolution stored values through tasks.dicom.decoders."""
    ds = pydicom.dcmread(real(name))
    facts: dict = {}
    ds, uid = px.transfer_syntax(ds, facts)
    layout, _ = px.check_image(ds, uid, px.DEFAULT_MAX_PIXELS)
    return decoders.decode(ds, uid, layout).array


def box(image: np.ndarray) -> np.ndarray:
    im = Image.fromarray(image.astype(np.float32))
    return np.asarray(im.resize((SPEC.input_size, SPEC.input_size), Image.Resampling.BOX))


# -- lossless forms equal the uncompressed file ------------------------------------------------

LOSSLESS_PAIRS = [
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # chest CR, MONOCHROME1, 15 bits, JPEG 2000 lossless
    # WG04's *_UNCI files are the reference decodes of the lossy *_J2KI files
    ("RG1_J2KI.dcm", "RG1_UNCI.dcm"),
    ("RG3_J2KI.dcm", "RG3_UNCI.dcm"),
    ("MR2_J2KI.dcm", "MR2_UNCI.dcm"),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),  # extremity CR, 10 bits
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # 12 bits with rescale and window
    ("693_J2KR.dcm", "693_UNCR.dcm"),  # signed, Bits Stored 16 vs 14 in the headers
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # signed 16 bits, RLE via pylibjpeg-rle
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # pyjpegls
    ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
    ("MR_small_implicit.dcm", "MR_small.dcm"),
]


@pytest.mark.parametrize(("lossless", "uncompressed"), LOSSLESS_PAIRS)
def test_lossless_forms_equal_the_uncompressed_file(lossless, uncompressed):
    """Stored values and the model tensor are identical (full-resolution decoding)."""
    assert np.array_equal(stored(lossless), stored(uncompressed))
    a, b = full(lossless), full(uncompressed)
    assert np.array_equal(a.image, b.image)
    assert a.facts["window"] == b.facts["window"] and a.facts["inverted"] == b.facts["inverted"]


def test_jpeg2000_decoders_agree():
    ds = pydicom.dcmread(real("MR_small_jp2klossless.dcm"))
    decoder = pydicom.pixels.get_decoder(ds.file_meta.TransferSyntaxUID)
    expected = stored("MR_small.dcm")
    for plugin in decoder.available_plugins:
        arr = decoder.as_array(ds, raw=True, decoding_plugin=plugin)[0]
        assert np.array_equal(arr, expected), plugin


# -- MONOCHROME1 -----------------------------------------------------------------------------


def test_monochrome1_chest_has_dark_lungs_and_bright_spine():
    res = full("RG1_UNCR.dcm")
    assert res.facts["photometric"] == "MONOCHROME1" and res.facts["inverted"] is True
    assert res.facts["window"] == {
        "source": "window",
        "center": 15000.0,
        "width": 30000.0,
        "function": "LINEAR",
    }
    u = unit(res)
    right_lung, left_lung = u[40:80, 30:55].mean(), u[40:80, 95:120].mean()
    spine = u[40:100, 68:80].mean()
    assert right_lung + 0.2 < spine and left_lung + 0.2 < spine  # ~0.60, ~0.56 vs ~0.88
    # the raw stored values are the other way round: MONOCHROME1 stores bone as low values
    raw = pydicom.dcmread(real("RG1_UNCR.dcm")).pixel_array
    assert raw[521:1043, 368:675].mean() > raw[521:1303, 835:982].mean()


def test_thumbnail_of_the_chest_is_upright_and_inverted(tmp_path):
    res = px.preprocess(real("RG1_J2KR.dcm"), SPEC, thumbnail_size=256)
    thumb = res.thumbnail
    assert thumb.shape == (256, 241)
    lung, spine = thumb[68:137, 48:88].mean(), thumb[68:171, 109:129].mean()
    assert lung + 40 < spine


# -- reduced-resolution decoding ---------------------------------------------------------------


def test_reduced_jpeg2000_chest_within_tolerance():
    red = px.preprocess(real("RG1_J2KR.dcm"), SPEC)
    assert red.facts["decoder"] == "pillow-j2k-reduce"
    assert red.facts["reduce_level"] == 2 and red.facts["decoded_shape"] == [489, 461]
    err = np.abs(unit(red) - unit(full("RG1_UNCR.dcm")))
    # measured: mean 0.0031, p99 0.024, max 0.082 (at the collimator edge)
    assert err.mean() < 0.005 and np.percentile(err, 99) < 0.03 and err.max() < 0.1
    lossy = px.preprocess(real("RG1_J2KI.dcm"), SPEC)
    assert lossy.facts["reduce_level"] == 2
    err = np.abs(unit(lossy) - unit(full("RG1_UNCR.dcm")))
    assert err.mean() < 0.005 and err.max() < 0.1


def test_reduced_size_rounding_is_corrected():
    # At k=3 OpenJPEG makes ceil(1955 / 8) = 245 rows where Pillow's plugin allots 244, which
    # makes a plain Pillow load() fail; the corrected size decodes, with no fallback.
    red = px.preprocess(real("RG1_J2KR.dcm"), SPEC, reduce_margin=1.0)
    assert red.facts["reduce_level"] == 3 and red.facts["decoded_shape"] == [245, 231]
    assert "reduced_fallback" not in red.facts
    err = np.abs(unit(red) - unit(full("RG1_UNCR.dcm")))
    # the smallest covering level is the less accurate trade-off: mean 0.0063, max 0.19
    assert err.mean() < 0.01 and err.max() < 0.25


def test_reduced_jpeg2000_extremity_within_looser_tolerance():
    # a narrow window (1024 of 10 bits) over sharp bone edges: measured mean 0.0042, max 0.18
    red = px.preprocess(real("RG3_J2KR.dcm"), SPEC)
    assert red.facts["reduce_level"] == 2
    err = np.abs(unit(red) - unit(full("RG3_UNCR.dcm")))
    assert err.mean() < 0.01 and err.max() < 0.25


def test_signedness_mismatch_falls_back_to_pydicom_correction():
    # J2K codestream unsigned, Pixel Representation 1, Bits Stored 13 (pydicom issue 1149)
    res = px.preprocess(real("J2K_pixelrep_mismatch.dcm"), SPEC)
    assert res.facts["decoder"] == "pylibjpeg" and "Pixel Representation" in res.facts.get(
        "reduced_fallback", ""
    )
    arr = stored("J2K_pixelrep_mismatch.dcm")
    assert np.array_equal(arr, pydicom.dcmread(real("J2K_pixelrep_mismatch.dcm")).pixel_array)
    assert arr.min() < 0


# -- LUTs against pydicom's reference implementation -------------------------------------------


def test_voi_lut_sequence_matches_pydicom():
    ds = pydicom.dcmread(real("vlut_04.dcm"))
    res = full("vlut_04.dcm")
    assert res.facts["window"]["source"] == "voi_lut"
    expected = apply_voi_lut(ds.pixel_array, ds, prefer_lut=True) / 65535.0  # 16-bit LUT output
    np.testing.assert_allclose(unit(res), box(expected), atol=5e-5)


def test_modality_lut_sequence_matches_pydicom():
    ds = pydicom.dcmread(real("mlut_18.dcm"))
    res = full("mlut_18.dcm")
    assert res.facts["modality_lut"]["source"] == "lut"
    values = apply_modality_lut(ds.pixel_array, ds)
    lo, hi = np.percentile(values, SPEC.percentiles)
    np.testing.assert_allclose(res.facts["window"]["values"], [lo, hi], atol=1e-9)
    np.testing.assert_allclose(unit(res), box(np.clip((values - lo) / (hi - lo), 0, 1)), atol=5e-5)


def test_rescale_and_window_match_pydicom():
    ds = pydicom.dcmread(real("MR2_UNCR.dcm"))  # slope 3.77, window 1000/2000
    res = full("MR2_UNCR.dcm")
    assert res.facts["modality_lut"]["slope"] == pytest.approx(3.774114)
    modality = apply_modality_lut(ds.pixel_array, ds)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((modality - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(unit(res), box(expected), atol=5e-5)


# -- other real files that must decode ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "decoder"),
    [
        ("JPGExtended.dcm", "pylibjpeg"),  # JPEG Extended 12-bit
        ("JPEG-LL.dcm", "gdcm"),  # JPEG lossless SV1
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", "gdcm"),
        ("bad_sequence.dcm", "gdcm"),  # invalid private sequence, pixels fine
        ("JPEGLSNearLossless_16.dcm", "pyjpegls"),
        ("image_dfl.dcm", "native"),  # deflated explicit VR
        ("MR_small_padded.dcm", "native"),  # pixel data with excess padding
        ("693_J2KI.dcm", "pylibjpeg"),
        ("CT_small.dcm", "native"),
    ],
)
def test_real_files_decode_like_pydicom(name, decoder):
    res = px.preprocess(real(name), SPEC, reduced=False)
    assert res.facts["decoder"] == decoder and res.image.shape == (3, 150, 150)
    ds = pydicom.dcmread(real(name))
    assert np.array_equal(stored(name), ds.pixel_array)


# -- broken and unusable real files ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "'Pixel Data' is truncated: 8130 bytes present, 8192 expected"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "pylibjpeg: Error decoding the J2K data"),
        ("JPEG-lossy.dcm", "scan start must be zero"),  # the unfixed NM1_JPLY
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "End of file reached before delimiter"),
        ("rtplan_truncated.dcm", "(7FE0,0010) 'Pixel Data' is missing"),
        ("rtplan.dcm", "(7FE0,0010) 'Pixel Data' is missing"),
        ("waveform_ecg.dcm", "(7FE0,0010) 'Pixel Data' is missing"),
        ("meta_missing_tsyntax.dcm", "(0028,0010) 'Rows' is missing"),
        ("badVR.dcm", "(0028,0008) 'Number of Frames' value '1A' is not an integer"),
        ("liver_1frame.dcm", "(0028,0100) 'Bits Allocated' value '1' is not supported"),
        ("no_meta.dcm", "not a DICOM file"),
        ("SC_rgb.dcm", "value 'RGB' with (0028,0002) 'Samples per Pixel' 3 is not grayscale"),
        ("US1_J2KR.dcm", "'YBR_RCT'"),
        ("OBXXXX1A.dcm", "'PALETTE COLOR'"),
        ("SC_ybr_full_422_uncompressed.dcm", "'YBR_FULL_422'"),
        ("emri_small.dcm", "(0028,0008) 'Number of Frames' value '10' is not supported"),
        ("eCT_Supplemental.dcm", "single-frame images only"),
    ],
)
def test_broken_real_files_fail_with_a_reason(name, reason):
    with pytest.raises(InputError) as info:
        px.preprocess(real(name), SPEC)
    assert reason in str(info.value)
    assert "site-packages" not in str(info.value)  # no file paths in reasons
