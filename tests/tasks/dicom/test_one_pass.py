"""One reduction pass for the model input and the thumbnail: bounds against float64 arithmetic.

The pixel path windows the image and area-resizes it to the model input and the thumbnail in
one pass (``pixels.BoxPlan``, ``pixels.box_means``). Bounds asserted here, in [0, 1] units
against float64 arithmetic on every pixel followed by an area resize (Pillow's BOX filter in
float32 mode, as in test_pixels.py):

- table path (the window clips, sigmoid, LUTs): 16-bit display levels, exact means:
  0.5/65535 = 7.63e-6, plus float32 rounding -> :data:`TABLE_TOL`;
- straight-line path (a window that clips nothing): the line applied to exact means of the
  stored values -> :data:`LINE_TOL`;
- thumbnail: exact means, within one grey level of the rounded float64 value.

(The previous path, two Pillow 16-bit resizes and a thumbnail from every k-th pixel, was within
3.1e-5; its thumbnails differed from an exact area average by up to ~100 grey levels on
noisy synthetic images: ``benchmarks/bench_decode.py --compare-with 71f93ea``.)
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tasks.dicom.pixels as px
from model.spec import PreprocessSpec
from tasks.dicom import synth
from tasks.dicom.decoders import decode
from tasks.dicom.outcomes import InputError
from tasks.dicom.thumbnails import thumbnail_shape

SPEC = PreprocessSpec()
TABLE_TOL = 7.7e-6
LINE_TOL = 3e-7  # LINEAR_TOLERANCE (1e-9) + float32 rounding of the output and the reference


def unit(image: np.ndarray) -> np.ndarray:
    return image[0] * SPEC.std[0] + SPEC.mean[0]


def pillow_box(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(np.asarray(image, dtype=np.float32))
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BOX), dtype=np.float64)


def float64_display(src) -> np.ndarray:
    """Every pixel's display value in float64 (the pixel path's own transforms, unquantised)."""
    ds = px.read_dataset(src)
    ds, tsyntax = px.transfer_syntax(ds, {})
    layout, photometric = px.check_image(ds, tsyntax, px.DEFAULT_MAX_PIXELS)
    stats = px.StoredValues(decode(ds, tsyntax, layout).array, layout)
    modality = px.modality_transform(ds, layout)
    voi = px.voi_transform(ds, SPEC, modality, stats)
    invert, _ = px.inversion(ds, photometric)
    return np.take(px.display_table(stats, modality, voi, invert), stats.index)


def write(tmp_path, name="a.dcm", **changes):
    params = synth.ImageParams(**{"rows": 700, "columns": 620, "bits_stored": 12, **changes})
    return synth.write_image(tmp_path / name, params, positive=True, seed=3)["path"]


# -- box bounds and exact means ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_box_means_equal_pillows_box_filter(seed):
    """Shrinking, enlarging and mixed shapes, several outputs at once: the exact means equal
    Pillow's float BOX resize (which evaluates the same rule in double precision)."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        rows, cols = (int(v) for v in rng.integers(1, 700, 2))
        shapes = [
            tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(int(rng.integers(1, 4)))
        ]
        image = rng.integers(0, 65536, (rows, cols)).astype(np.uint16)
        plan = px.BoxPlan(rows, cols, shapes)
        means = plan.means(plan.sum_rows(lambda a, b, im=image: im[a:b], 65535))
        for shape, got in zip(shapes, means, strict=True):
            assert got.shape == shape
            np.testing.assert_allclose(got, pillow_box(image, shape), rtol=1e-6, atol=1e-3)


def test_box_bounds_cover_the_input_once_when_shrinking():
    for n, m in [(2000, 150), (1840, 236), (2001, 256), (150, 150), (7, 3)]:
        first, count = px.box_bounds(n, m)
        assert first[0] == 0 and first[-1] + count[-1] == n
        assert np.array_equal(first[1:], first[:-1] + count[:-1])
    first, count = px.box_bounds(100, 150)  # enlarging: one input pixel per output pixel
    assert (count == 1).all() and first.max() == 99
    with pytest.raises(ValueError):
        px.box_bounds(0, 5)


def test_sums_use_64_bits_when_32_could_overflow():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 2**32, (300, 40), dtype=np.uint64).astype(np.uint32)
    plan = px.BoxPlan(300, 40, [(2, 3)])
    sums = plan.sum_rows(lambda a, b: image[a:b], 2**32 - 1)
    assert sums.dtype == np.int64
    (got,) = plan.means(sums)
    expected = image.astype(np.float64).reshape(2, 150, 40).mean(axis=1)
    expected = np.stack(
        [expected[:, :13].mean(1), expected[:, 13:27].mean(1), expected[:, 27:].mean(1)], 1
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_plans_are_kept_per_size_and_read_only():
    plan = px.box_plan(2000, 1840, ((150, 150), (256, 236)))
    assert px.box_plan(2000, 1840, ((150, 150), (256, 236))) is plan
    assert px.box_plan(2000, 1840, ((150, 150),)) is not plan
    with pytest.raises(ValueError):
        plan.cuts[0] = 1
    with pytest.raises(ValueError):
        plan.row_boxes[0][0][0] = 1


def test_chunks_cover_every_segment_in_order():
    for rows, cols in [(2000, 1840), (5000, 40), (40, 5000), (1, 1), (70000, 3)]:
        plan = px.BoxPlan(rows, cols, [(150, 150), thumbnail_shape(rows, cols, 256)])
        segments = [k for _, _, segs in plan.chunks for k, _, _ in segs]
        assert segments == list(range(len(plan.cuts) - 1))
        starts = [start for start, _, _ in plan.chunks]
        assert starts == sorted(starts) and plan.chunks[-1][1] == plan.cuts[-1]


# -- the pixel path against float64 arithmetic ----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "linear"),
    [
        ({"window_scale": 1.3}, True),
        ({"window_scale": 1.2, "voi_function": "LINEAR_EXACT", "rescale": (0.5, -1024.0)}, True),
        ({"bits_stored": 8, "window_scale": 1.2}, True),
        ({"window_scale": 0.7}, False),
        ({"window_scale": 0.8, "voi_function": "LINEAR_EXACT"}, False),
        ({"window_scale": 1.0, "voi_function": "SIGMOID"}, False),
        ({"window": False}, False),  # percentiles clip
        ({"bits_stored": 16, "signed": True, "window_scale": 0.9}, False),
        ({"bits_stored": 16, "signed": True, "window_scale": 1.2}, True),
    ],
)
@pytest.mark.parametrize("shape", [(700, 620), (2000, 1840), (181, 120)])
def test_model_input_and_thumbnail_bounds(tmp_path, changes, linear, shape):
    path = write(tmp_path, rows=shape[0], columns=shape[1], **changes)
    res = px.preprocess(path, SPEC, thumbnail_size=256)
    assert res.facts["window_linear"] is linear
    full = float64_display(path)
    tol = LINE_TOL if linear else TABLE_TOL
    np.testing.assert_allclose(unit(res.image), pillow_box(full, (150, 150)), rtol=0, atol=tol)
    reference = np.rint(pillow_box(full, res.thumbnail.shape) * 255.0)
    assert np.abs(res.thumbnail.astype(float) - reference).max() <= 1


def test_straight_line_and_table_paths_agree(tmp_path, monkeypatch):
    path = write(tmp_path, window_scale=1.3, rescale=(2.0, -1024.0))
    line = px.preprocess(path, SPEC, thumbnail_size=256)
    assert line.facts["window_linear"] is True
    monkeypatch.setattr(px, "display_line", lambda table, stats: None)
    table = px.preprocess(path, SPEC, thumbnail_size=256)
    assert table.facts["window_linear"] is False
    np.testing.assert_allclose(
        unit(line.image), unit(table.image), rtol=0, atol=TABLE_TOL + LINE_TOL
    )
    assert np.abs(line.thumbnail.astype(int) - table.thumbnail).max() <= 1


def test_display_line_sees_clipping_at_one_value():
    """A window that clips a single stored value the image holds is not a straight line."""
    stats = px.StoredValues(np.array([[10, 11], [12, 100]], dtype=np.uint16), None)  # type: ignore[arg-type]
    table = np.clip((stats.domain - 10) / 90.0, 0, 1)
    assert px.display_line(table, stats) == pytest.approx((0.0, 1 / 90.0))
    table = np.clip((stats.domain - 10) / 89.0, 0, 1)  # 100 would map to 1.011
    assert px.display_line(table, stats) is None


# -- the guard without a histogram ---------------------------------------------------------------


def test_clear_images_skip_the_histogram(tmp_path, monkeypatch):
    counted = []
    real = px.StoredValues.counts
    monkeypatch.setattr(
        px.StoredValues, "counts", property(lambda self: counted.append(1) or real.fget(self))
    )
    px.preprocess(write(tmp_path, window_scale=0.8), SPEC, thumbnail_size=256)
    assert counted == []  # a DICOM window, no padding: the box means proved the guard
    px.preprocess(write(tmp_path, "p.dcm", window=False), SPEC)
    assert counted  # percentiles need the histogram


@pytest.mark.parametrize("seed", range(6))
def test_box_mean_proof_never_passes_an_image_the_guard_fails(seed):
    """Images built to sit near the guard's threshold (a flat field with a few percent of
    outliers, low-contrast gradients): whenever the box means claim a pass, the exact
    histogram guard passes too, and both decide alike on clear cases."""
    rng = np.random.default_rng(seed)
    proved = failed = 0
    for _ in range(60):
        rows, cols = (int(v) for v in rng.integers(150, 600, 2))
        base = rng.uniform(0.1, 0.9)
        image = np.full((rows, cols), base)
        kind = rng.integers(3)
        if kind == 0:  # outliers: a fraction near the 1% / 99% ranks
            frac = rng.uniform(0.0, 0.05)
            mask = rng.random((rows, cols)) < frac
            image[mask] = rng.choice([0.0, 1.0], size=int(mask.sum()))
        elif kind == 1:  # a gradient of small or large amplitude
            image = image + rng.uniform(0, 0.1) * np.linspace(-1, 1, cols)[None, :]
        else:  # noise plus a bright block
            image = image + rng.normal(0, rng.uniform(0, 0.02), (rows, cols))
            r = int(rows * rng.uniform(0, 0.3))
            image[:r, : cols // 2] = 1.0
        stored = np.rint(np.clip(image, 0, 1) * 4095).astype(np.uint16)
        stats = px.StoredValues(stored, None)  # type: ignore[arg-type]
        table = stats.domain / 4095.0
        plan = px.BoxPlan(rows, cols, [(150, 150), thumbnail_shape(rows, cols, 256)])
        means, _ = px.box_means(stats, table, plan)
        voi = px.Transform(
            lambda x: x, {"source": "window", "center": 0, "width": 1, "function": "LINEAR"}
        )
        try:
            px.check_not_constant(table, stats, voi)
            passes = True
        except InputError:
            passes = False
        if plan.clearly_not_constant(means):
            proved += 1
            assert passes
        failed += not passes
    assert proved and failed  # both sides were exercised
