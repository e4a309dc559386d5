"""The pixel path on synthetic files: chain order, equivalences, tolerances, failures."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

import tasks.dicom.pixels as px
from model.spec import PreprocessSpec
from tasks.dicom import synth
from tasks.dicom.decoders import reduced
from tasks.dicom.outcomes import InputError
from tasks.dicom.thumbnails import thumbnail_shape, write_thumbnail

SPEC = PreprocessSpec()
TOL = 5e-5  # the pixel path vs float64 arithmetic (tighter bounds: test_one_pass.py)


def unit(image: np.ndarray, spec: PreprocessSpec = SPEC, channel: int = 0) -> np.ndarray:
    """Undo the normalisation: the [0, 1] windowed, resized image."""
    return image[channel] * spec.std[channel] + spec.mean[channel]


def write(tmp_path, name="a.dcm", positive=True, seed=0, **changes) -> str:
    params = synth.ImageParams(**{"rows": 240, "columns": 200, **changes})
    return synth.write_image(tmp_path / name, params, positive=positive, seed=seed)["path"]


def box(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(image.astype(np.float32))
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BOX))


def reference(path, window, invert) -> np.ndarray:
    """An independent float64 implementation: modality LUT -> window -> invert -> box."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    out = window(stored * slope + intercept)
    return box(1.0 - out if invert else out, (SPEC.input_size, SPEC.input_size))


# -- output contract -------------------------------------------------------------------------


def test_output_shape_dtype_and_json_facts(tmp_path):
    path = write(tmp_path)
    res = px.preprocess(path, SPEC, thumbnail_size=64)
    assert res.image.shape == (3, 150, 150) and res.image.dtype == np.float32
    assert np.array_equal(res.image[0], res.image[1]) and np.array_equal(res.image[0], res.image[2])
    u = unit(res.image)
    assert u.min() >= 0.0 and u.max() <= 1.0 + 1e-6
    assert res.thumbnail.dtype == np.uint8 and res.thumbnail.shape == (64, 53)
    facts = json.loads(json.dumps(res.facts))
    assert facts["spec_sha256"] == SPEC.sha256
    assert facts["decoder"] == "native" and facts["rows"] == 240 and facts["columns"] == 200
    assert facts["window"]["source"] in ("window", "percentile")


def test_spec_channels_size_and_normalisation(tmp_path):
    path = write(tmp_path)
    spec = PreprocessSpec(input_size=64, channels=1, mean=(0.2,), std=(0.5,))
    a = px.preprocess(path, spec).image
    b = px.preprocess(path, dataclasses.replace(spec, input_size=64, mean=(0.0,), std=(1.0,)))
    assert a.shape == (1, 64, 64)
    np.testing.assert_allclose(a[0], (b.image[0] - 0.2) / 0.5, atol=1e-6)


def test_every_source_kind_gives_the_same_result(tmp_path):
    path = write(tmp_path)
    expected = px.preprocess(path, SPEC).image
    with open(path, "rb") as f:
        data = f.read()
    ds = pydicom.dcmread(path)
    before = ds.to_json_dict()
    for src in (str(path), tmp_path / "a.dcm", data, io.BytesIO(data), ds):
        assert np.array_equal(px.preprocess(src, SPEC).image, expected)
    assert ds.to_json_dict() == before  # the caller's data set is not modified


# -- chain: modality, VOI, inversion ----------------------------------------------------------


@pytest.mark.parametrize("window", [True, False])
def test_monochrome1_equals_monochrome2_after_inversion(tmp_path, window):
    m1 = write(tmp_path, "m1.dcm", photometric="MONOCHROME1", window=window)
    m2 = write(tmp_path, "m2.dcm", photometric="MONOCHROME2", window=window)
    a, b = px.preprocess(m1, SPEC), px.preprocess(m2, SPEC)
    assert a.facts["inverted"] is True and b.facts["inverted"] is False
    # DICOM's LINEAR window is offset by half a value (c - 0.5), which inversion does not
    # mirror: 1 / (width - 1) apart at most; percentile windows are mirror-exact
    np.testing.assert_allclose(unit(a.image), unit(b.image), atol=1e-3 if window else TOL)
    # bright = bone: the lung fields (phantom ellipses at x 0.3/0.7) are darker than the midline
    u = unit(a.image)
    assert u[60:90, 35:55].mean() + 0.1 < u[60:90, 68:82].mean()


def test_presentation_lut_inverse_inverts_monochrome2(tmp_path):
    path = write(tmp_path, photometric="MONOCHROME2")
    ds = pydicom.dcmread(path)
    plain = px.preprocess(ds, SPEC)
    ds.PresentationLUTShape = "INVERSE"
    inv = px.preprocess(ds, SPEC)
    assert inv.facts["inverted_by"].startswith("(2050,0020)")
    np.testing.assert_allclose(unit(inv.image), 1.0 - unit(plain.image), atol=TOL)


@pytest.mark.parametrize("scale", [1.4, 0.6])  # wide: nothing clipped; narrow: clips
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_dicom_window_matches_the_standard(tmp_path, scale, function):
    path = write(
        tmp_path, window_scale=scale, voi_function=function, rescale=(0.5, -100.0), bits_stored=14
    )
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    formulas = {  # PS3.3 C.11.2.1.2
        "LINEAR": lambda x: np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1),
        "LINEAR_EXACT": lambda x: np.clip((x - c) / w + 0.5, 0, 1),
        "SIGMOID": lambda x: 1 / (1 + np.exp(-4 * (x - c) / w)),
    }
    res = px.preprocess(path, SPEC)
    assert res.facts["window"] == {
        "source": "window",
        "center": c,
        "width": w,
        "function": function,
    }
    np.testing.assert_allclose(
        unit(res.image), reference(path, formulas[function], False), atol=TOL
    )


def test_percentile_window_and_padding(tmp_path):
    path = write(tmp_path, window=False, bits_stored=12)
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.copy()
    arr[:, :40] = 0  # a padded border the percentiles must ignore
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 0
    res = px.preprocess(ds, SPEC)
    lo, hi = np.percentile(arr[:, 40:], SPEC.percentiles)
    win = res.facts["window"]
    assert win["source"] == "percentile" and win["padding_excluded"] == [0, 0]
    np.testing.assert_allclose(win["values"], [lo, hi], rtol=0, atol=1e-9)
    expected = box(np.clip((arr - lo) / (hi - lo), 0, 1), (150, 150))
    np.testing.assert_allclose(unit(res.image), expected, atol=TOL)
    forced = px.preprocess(path, dataclasses.replace(SPEC, window_policy="percentile"))
    assert forced.facts["window"]["source"] == "percentile"


def test_weighted_percentiles_equal_numpy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = np.sort(rng.choice(1000, size=rng.integers(1, 50), replace=False))
        counts = rng.integers(1, 20, size=len(values))
        qs = (0.0, 0.5, 13.7, 50.0, 99.5, 100.0)
        expected = np.percentile(np.repeat(values, counts), qs)
        np.testing.assert_allclose(px.weighted_percentiles(values, counts, qs), expected, atol=1e-9)


def test_negative_rescale_slope_flips_the_image(tmp_path):
    pos = write(tmp_path, "p.dcm", window=False, rescale=(1.0, 0.0))
    neg = write(tmp_path, "n.dcm", window=False, rescale=(-1.0, 0.0))
    a, b = px.preprocess(pos, SPEC), px.preprocess(neg, SPEC)
    np.testing.assert_allclose(unit(b.image), 1.0 - unit(a.image), atol=TOL)


def test_modality_and_voi_lut_sequences(tmp_path):
    path = write(tmp_path, window=False, bits_stored=10)
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.int64)
    mod = Dataset()
    mod.LUTDescriptor = [1024, 0, 16]
    mod_data = np.rint(np.sqrt(np.arange(1024) / 1023) * 4000).astype(np.uint16)
    mod.LUTData = mod_data.tolist()
    mod.ModalityLUTType = "OD"
    voi = Dataset()
    voi.LUTDescriptor = [3001, 500, 12]
    voi_data = np.rint(np.linspace(0, 1, 3001) ** 2 * 4095).astype(np.uint16)
    voi.LUTData = voi_data.tolist()
    ds.ModalityLUTSequence = [mod]
    ds.VOILUTSequence = [voi]
    res = px.preprocess(ds, SPEC)
    assert res.facts["modality_lut"]["source"] == "lut"
    assert res.facts["window"]["source"] == "voi_lut"
    m = mod_data[stored]
    v = voi_data[np.clip(m - 500, 0, 3000)] / 4095.0
    np.testing.assert_allclose(unit(res.image), box(v, (150, 150)), atol=TOL)
    # without the VOI LUT the percentiles are taken over modality (LUT output) values
    del ds.VOILUTSequence
    res = px.preprocess(ds, SPEC)
    np.testing.assert_allclose(
        res.facts["window"]["values"], np.percentile(m, SPEC.percentiles), atol=1e-9
    )


def test_invalid_window_falls_back_to_percentiles_and_says_why(tmp_path):
    ds = pydicom.dcmread(write(tmp_path))
    ds.WindowWidth = "0"
    res = px.preprocess(ds, SPEC)
    assert res.facts["window"]["source"] == "percentile"
    assert "(0028,1051) 'Window Width' value '0' is invalid" in res.facts["window_rejected"]


def test_signed_and_unsigned_storage_give_the_same_image(tmp_path):
    spec = dataclasses.replace(SPEC, window_policy="percentile")
    s = write(tmp_path, "s.dcm", signed=True, bits_stored=12)
    u = write(tmp_path, "u.dcm", signed=False, bits_stored=12)
    a, b = px.preprocess(s, spec), px.preprocess(u, spec)
    np.testing.assert_allclose(unit(a.image), unit(b.image), atol=TOL)


def test_stray_high_bits_are_masked(tmp_path):
    dirty = write(tmp_path, "d.dcm", stray_high_bits=True, bits_stored=11)
    clean = write(tmp_path, "c.dcm", bits_stored=11)
    a, b = px.preprocess(dirty, SPEC), px.preprocess(clean, SPEC)
    assert a.facts["high_bits_masked"] is True and b.facts["high_bits_masked"] is False
    assert np.array_equal(a.image, b.image)


def test_missing_transfer_syntax_is_inferred(tmp_path):
    ds = pydicom.dcmread(write(tmp_path))
    expected = px.preprocess(ds, SPEC).image
    del ds.file_meta.TransferSyntaxUID
    res = px.preprocess(ds, SPEC)
    assert res.facts["transfer_syntax_inferred"] is True
    assert np.array_equal(res.image, expected)
    assert "TransferSyntaxUID" not in ds.file_meta


# -- decoding: reduced resolution -------------------------------------------------------------


def test_choose_reduce_level_and_openjpeg_sizes():
    assert reduced.choose_reduce_level((1955, 1841), (300, 300), 5) == 2
    assert reduced.choose_reduce_level((1955, 1841), (150, 150), 5) == 3
    assert reduced.choose_reduce_level((1955, 1841), (150, 150), 1) == 1
    assert reduced.choose_reduce_level((200, 200), (150, 150), 5) == 0
    hdr = reduced.J2KHeader(0, 0, 0, 1841, 1955, 1, 15, False, 5)
    assert hdr.reduced_size(3) == (231, 245)  # ceil; Pillow's round-half-up gives 244 rows


@pytest.mark.parametrize(
    ("syntax", "bits"), [("j2k_lossless", 12), ("j2k", 16), ("jpeg_baseline", 8)]
)
def test_reduced_decoding_stays_close_to_full(tmp_path, syntax, bits):
    path = write(tmp_path, rows=1400, columns=1240, syntax=syntax, bits_stored=bits)
    full = px.preprocess(path, SPEC, reduced=False)
    red = px.preprocess(path, SPEC, reduced=True, thumbnail_size=256)
    if syntax == "jpeg_baseline":
        assert red.facts["decoder"] == "pillow-jpeg-draft" and red.facts["draft_scale"] == 4
    else:
        assert red.facts["decoder"] == "pillow-j2k-reduce" and red.facts["reduce_level"] == 2
    rows, cols = red.facts["decoded_shape"]
    assert min(rows, cols) >= 2 * SPEC.input_size and (rows, cols) >= red.thumbnail.shape
    assert full.facts["reduce_level"] == 0 and full.facts["decoded_shape"] == [1400, 1240]
    # Tolerance on the [0, 1] 150x150 image (measured on such synthetic images: mean ~0.007,
    # max ~0.17, the maximum at the phantom's hard lung edges; real chest CR: test_real_files)
    err = np.abs(unit(red.image) - unit(full.image))
    assert err.mean() < 0.01 and err.max() < 0.25


def test_reduced_failure_falls_back_to_full(tmp_path, monkeypatch):
    path = write(tmp_path, rows=700, columns=600, syntax="j2k_lossless", bits_stored=12)
    full = px.preprocess(path, SPEC, reduced=False)

    def broken(self):
        raise OSError("broken data stream when reading image file")

    monkeypatch.setattr(reduced._ExactReduceJ2K, "load", broken)
    res = px.preprocess(path, SPEC, reduced=True)
    assert res.facts["decoder"] == "pylibjpeg" and res.facts["reduce_level"] == 0
    assert "broken data stream" in res.facts["reduced_fallback"]
    assert np.array_equal(res.image, full.image)


def test_j2k_header_mismatch_is_not_reduced(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, rows=700, columns=600, syntax="j2k_lossless"))
    ds.BitsStored = ds.BitsStored - 1  # codestream precision now disagrees with the header
    ds.HighBit = ds.BitsStored - 1
    res = px.preprocess(ds, SPEC)
    assert res.facts["reduce_level"] == 0
    assert "(0028,0101) 'Bits Stored'" in res.facts["reduced_fallback"]


# -- failures ------------------------------------------------------------------------------------


def test_every_broken_file_fails_with_its_reason(tmp_path):
    expected = synth.write_broken(tmp_path)
    for name, substring in expected.items():
        with pytest.raises(InputError) as info:
            px.preprocess(tmp_path / name, SPEC)
        assert substring in str(info.value), (name, str(info.value))
        assert str(tmp_path) not in str(info.value)  # no paths in reasons


def test_unselected_files_colour_and_multiframe_fail_others_decode(tmp_path):
    why = synth.write_unselected(tmp_path)
    for name in why:
        if name in ("multiframe.dcm", "rgb.dcm"):
            with pytest.raises(InputError, match=r"\(0028,000[84]\)"):
                px.preprocess(tmp_path / name, SPEC)
        else:
            assert px.preprocess(tmp_path / name, SPEC).image.shape == (3, 150, 150)


def test_memory_guard_refuses_before_decoding(tmp_path, monkeypatch):
    path = write(tmp_path)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decode() called although the image exceeds max_pixels")

    monkeypatch.setattr(px, "decode", must_not_decode)
    with pytest.raises(InputError, match=r"240 x .*200 .* exceeds the limit of 40000 samples"):
        px.preprocess(path, SPEC, max_pixels=40_000)


def test_decoder_messages_are_combined(tmp_path):
    ds = pydicom.dcmread(write(tmp_path, syntax="jpeg_ls"))
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    with pytest.raises(InputError) as info:
        px.preprocess(ds, SPEC)
    text = str(info.value)
    assert text.startswith("decoding JPEG-LS Lossless Image Compression pixel data failed")
    assert "pyjpegls:" in text and "gdcm:" in text and "pylibjpeg:" in text


def test_no_pixel_data_and_wrong_types(tmp_path):
    ds = pydicom.dcmread(write(tmp_path))
    del ds.PixelData
    with pytest.raises(InputError, match=r"\(7FE0,0010\) 'Pixel Data' is missing"):
        px.preprocess(ds, SPEC)
    with pytest.raises(InputError, match="cannot open the file"):
        px.preprocess(tmp_path / "nope.dcm", SPEC)
    with pytest.raises(TypeError):
        px.preprocess(12, SPEC)  # type: ignore[arg-type]


# -- thumbnails ------------------------------------------------------------------------------


def test_thumbnail_comes_from_the_same_windowed_image(tmp_path):
    path = write(tmp_path, rows=600, columns=500, photometric="MONOCHROME1")
    res = px.preprocess(path, SPEC, thumbnail_size=256)
    assert res.thumbnail.shape == thumbnail_shape(600, 500, 256) == (256, 213)
    again = box(res.thumbnail.astype(np.float32) / 255.0, (150, 150))
    assert np.abs(again - unit(res.image)).mean() < 0.01


def test_sampled_thumbnail_of_a_large_image_matches_the_model_input(tmp_path):
    """At 2000 px the thumbnail comes from the same pass as the model's input (exact box means,
    tests/tasks/dicom/test_one_pass.py): brought to 150 px it equals the model's input to
    within 1% (mean)."""
    path = write(tmp_path, rows=2000, columns=1800, photometric="MONOCHROME1")
    res = px.preprocess(path, SPEC, thumbnail_size=256)
    assert res.thumbnail.shape == thumbnail_shape(2000, 1800, 256)
    again = box(res.thumbnail.astype(np.float32) / 255.0, (150, 150))
    assert np.abs(again - unit(res.image)).mean() < 0.01


def test_write_thumbnail_jpeg(tmp_path):
    img = (np.arange(300 * 400) % 256).astype(np.uint8).reshape(300, 400)
    img = np.kron(img[::20, ::20], np.ones((20, 20), np.uint8))  # blocks: JPEG keeps them
    out = write_thumbnail(img, tmp_path / "sub" / "t.jpg")
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.mode == "L" and im.size == (256, 192)
        assert not im.info.get("exif") and not im.getexif()  # no metadata of any kind
        back = np.asarray(im).astype(np.float32)
    expected = np.asarray(Image.fromarray(img).resize((256, 192), Image.Resampling.BOX))
    assert np.abs(back - expected).mean() < 2.0  # quality 90: a level or two of 255
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["t.jpg"]  # no temporary left
    small = write_thumbnail(img[:10, :20], tmp_path / "s.jpg")
    with Image.open(small) as im:
        assert im.size == (20, 10)  # never upscaled
    with pytest.raises(ValueError, match="uint8"):
        write_thumbnail(img.astype(np.float32), tmp_path / "x.jpg")
