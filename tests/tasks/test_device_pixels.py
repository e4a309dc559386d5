"""The device pixel path (tasks/device), run in torch on the CPU, equals the CPU path.

Tolerance: none. The device path's model input is the CPU path's (``tasks.ingest.decode_item``,
``tasks.dicom.pixels.preprocess``) to the bit: the same display table (built by the same
functions from a histogram instead of the pixels), the same 16-bit levels or the same straight
line, the same exact integer box sums divided once in float64, the same float32 normalisation.
The thumbnails are the same arrays (so the same JPEG bytes), the facts are the same plus
``pixel_path``, and a file that fails fails with the same reason. Checked on real files
(pydicom's and pydicom-data's CT, MR, CR: MONOCHROME1, signed and unsigned, rescale, modality
LUT, VOI LUT, windows, padding) and generated ones, all sizes mixed in one batch, and in small
batches.

Frames decoded "on the device" (JPEG 2000 here, by a stand-in decoder that uses OpenJPEG and
returns torch tensors, the contract nvImageCodec's wrapper keeps) equal the CPU path's full
decode; a frame the decoder refuses is decoded on the CPU and says so; when nvImageCodec is
missing the frames are decoded by the workers as on the CPU path.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import openjpeg
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000, HTJ2KLossless, JPEG2000Lossless

from model.checkpoint import untrained_checkpoint
from model.spec import PreprocessSpec
from tasks.device import arena as arenas
from tasks.device.pipeline import DevicePixels
from tasks.device.pool import DevicePool, buffer_bytes
from tasks.device.prepare import DONE, FRAME, PIXELS, Options, prepare_item
from tasks.device.processor import DeviceShardProcessor, resolve_pixel_path, shard_processor
from tasks.device.resize import box_counts, box_sums
from tasks.dicom import pixels as px
from tasks.dicom import synth
from tasks.dicom.decoders import nvimgcodec
from tasks.dicom.discovery import SourceFile
from tasks.ingest import decode_item, scan
from tasks.screening import ShardProcessor

SPEC = PreprocessSpec()

REAL = [
    "CT_small.dcm",  # signed, rescale, pixel padding
    "MR_small.dcm",  # signed 16-bit, window
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_padded.dcm",
    "RG1_UNCR.dcm",  # chest CR, MONOCHROME1, 15 bits
    "RG3_UNCR.dcm",  # MONOCHROME1, 10 bits
    "RG1_J2KR.dcm",  # JPEG 2000 lossless, decoded at reduced resolution by the workers
    "MR2_UNCR.dcm",  # rescale and window, 12 bits
    "693_UNCR.dcm",  # signed 14 bits, padding, rescale
    "mlut_18.dcm",  # modality LUT sequence
    "vlut_04.dcm",  # VOI LUT sequence, 8 bits
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # lossless JPEG, Presentation LUT Shape
    "JPEG-lossy.dcm",  # JPEG extended 12-bit
    "image_dfl.dcm",  # deflated
    "examples_overlay.dcm",
    "rtdose_1frame.dcm",  # 32-bit stored values: left to the CPU path (DONE)
]


def real(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} not found: is pydicom-data (data_store) installed?"
    return Path(path)


def call(path: Path, thumbs: Path | None, *, reduced: bool = True, both: bool = False) -> tuple:
    """``decode_item``'s positional arguments, built by name (its signature may grow)."""
    src = SourceFile(uri=str(path), path=str(path))
    uid = f"1.2.3.{abs(hash(path.name)) % 10**8}"
    kwargs = {"reduced": reduced, "thumbnails_dir": str(thumbs) if thumbs else None}
    if "both_fingerprints" in inspect.signature(decode_item).parameters:
        kwargs["both_fingerprints"] = both
    return inspect.signature(decode_item).bind(src, uid, SPEC.to_dict(), **kwargs).args


def device_records(calls, *, frame_decoder=None, batch_size=256, workers=0, handover="inline"):
    pixels = DevicePixels(
        SPEC, torch.device("cpu"), batch_size=batch_size, frame_decoder=frame_decoder
    )
    syntaxes = frame_decoder.syntaxes if frame_decoder is not None else ()
    with DevicePool(workers, pixels, Options(frozenset(syntaxes)), handover=handover) as pool:
        pool.headers = {}
        return pool.decode_all(list(calls))


def without(facts: dict, *keys: str) -> dict:
    return {k: v for k, v in facts.items() if k not in keys}


def assert_same(cpu, dev, *, ignore=("pixel_path",), same_fingerprints=True):
    """Same outcome, reason, model input (to the bit), facts, hashes and thumbnail bytes."""
    assert dev.error == cpu.error, (cpu.uri, cpu.error, dev.error)
    if cpu.error is not None:
        return
    assert dev.image is not None and dev.image.dtype == np.float32
    assert np.array_equal(dev.image, cpu.image), (cpu.uri, np.abs(dev.image - cpu.image).max())
    assert without(dev.facts, *ignore) == without(cpu.facts, *ignore), cpu.uri
    assert dev.content_sha256 == cpu.content_sha256
    if same_fingerprints and hasattr(cpu, "fingerprints"):
        assert dev.fingerprints() == cpu.fingerprints()
    assert (cpu.thumbnail_path is None) == (dev.thumbnail_path is None)
    if cpu.thumbnail_path:
        assert Path(dev.thumbnail_path).read_bytes() == Path(cpu.thumbnail_path).read_bytes()


# -- the resize ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ((2000, 1840), (150, 150)),
        ((2000, 1840), (256, 235)),
        ((37, 1000), (150, 150)),  # enlarging the rows, shrinking the columns
        ((100, 90), (150, 150)),
        ((777, 513), (256, 169)),
        ((150, 150), (150, 150)),
    ],
)
def test_box_sums_are_the_cpu_paths_exact_sums(source, target):
    """One running sum, two shapes: the sums over pixels.box_bounds' rectangles, exactly, and
    the means are pixels.BoxPlan's to the bit."""
    rng = np.random.default_rng(sum(source))
    image = rng.integers(-32768, 65536, size=source).astype(np.int32)
    shapes = [target, (max(1, target[0] // 2), max(1, target[1] // 3))]
    got = box_sums(torch.from_numpy(image)[None], shapes, largest=65535)
    for shape, sums in zip(shapes, got, strict=True):
        (rf, rn), (cf, cn) = px.box_bounds(source[0], shape[0]), px.box_bounds(source[1], shape[1])
        expected = np.array(
            [
                [image[rf[i] : rf[i] + rn[i], cf[j] : cf[j] + cn[j]].sum() for j in range(shape[1])]
                for i in range(shape[0])
            ]
        )
        assert np.array_equal(sums[0].numpy(), expected)
    plan = px.BoxPlan(*source, shapes)
    means = plan.means(plan.sum_rows(lambda a, b: image[a:b], 65535))
    for shape, sums, mean in zip(shapes, got, means, strict=True):
        mine = sums[0] / box_counts(*source, shape, "cpu")
        assert np.array_equal(mine.numpy(), mean)


# -- real and generated files against decode_item -----------------------------------------------


@pytest.fixture(scope="module")
def real_calls(tmp_path_factory):
    root = tmp_path_factory.mktemp("thumbs")
    return root, [real(name) for name in REAL]


def test_real_files_equal_the_cpu_path_in_one_mixed_batch(real_calls):
    root, paths = real_calls
    cpu = [decode_item(*call(p, root / "cpu")) for p in paths]
    dev = device_records([call(p, root / "dev") for p in paths])
    assert sum(r.error is None for r in cpu) >= len(paths) - 2, [r.error for r in cpu]
    for c, d in zip(cpu, dev, strict=True):
        assert_same(c, d)
    kinds = {d.facts.get("pixel_path") for d in dev if d.error is None}
    assert kinds == {"device", "cpu"}  # rtdose (32-bit) went the CPU path's way


def test_real_files_equal_the_cpu_path_in_small_batches(real_calls):
    root, paths = real_calls
    small = [p for p in paths if p.stat().st_size < 3_000_000]
    cpu = [decode_item(*call(p, root / "cpu3")) for p in small]
    dev = device_records([call(p, root / "dev3") for p in small], batch_size=3)
    for c, d in zip(cpu, dev, strict=True):
        assert_same(c, d)


SYNTHETIC = [
    # (name, ImageParams changes)
    ("mono2", {}),
    ("mono1-clipped", {"photometric": "MONOCHROME1", "window_scale": 0.8}),
    ("signed-rescale", {"signed": True, "rescale": (2.0, -1024.0)}),
    ("percentile", {"window": False}),
    ("sigmoid", {"voi_function": "SIGMOID"}),
    ("linear-exact", {"voi_function": "LINEAR_EXACT"}),
    ("stray-bits", {"stray_high_bits": True}),
    ("16-bit", {"bits_stored": 16}),
    ("8-bit", {"bits_stored": 8}),
    ("big-endian", {"syntax": "explicit_be"}),
    ("rle", {"syntax": "rle", "photometric": "MONOCHROME1"}),
    ("jpeg-ls", {"syntax": "jpeg_ls"}),
    ("lossless-jpeg", {"syntax": "jpeg_lossless"}),
    ("j2k-lossless", {"syntax": "j2k_lossless"}),  # reduced resolution on the CPU
    ("j2k", {"syntax": "j2k"}),
    ("jpeg-baseline", {"syntax": "jpeg_baseline", "bits_stored": 8}),  # DCT-scaled draft
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = []
    for i, (name, changes) in enumerate(SYNTHETIC):
        rows, columns = 600 + 37 * (i % 4), 520 + 23 * (i % 3)  # several sizes in one batch
        if name in ("j2k-lossless", "jpeg-baseline"):  # large enough to decode reduced
            rows, columns = 1300, 1210
        params = synth.ImageParams(rows=rows, columns=columns, **changes)
        path = root / f"{name}.dcm"
        synth.write_image(path, params, positive=bool(i % 2), seed=21, study=i)
        paths.append(path)
    paths.append(_blank(root))
    return root, paths


def _blank(root: Path) -> Path:
    """A constant image: refused by both paths with the same reason."""
    path = root / "blank.dcm"
    synth.write_image(path, synth.ImageParams(rows=300, columns=300), positive=False, seed=1)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PixelData = np.full((300, 300), 700, dtype=np.uint16).tobytes()
    ds.save_as(path)
    return path


@pytest.mark.parametrize("reduced", [True, False])
def test_generated_files_equal_the_cpu_path(synthetic, reduced):
    root, paths = synthetic
    tag = "r" if reduced else "f"
    cpu = [decode_item(*call(p, root / f"cpu-{tag}", reduced=reduced)) for p in paths]
    dev = device_records([call(p, root / f"dev-{tag}", reduced=reduced) for p in paths])
    for c, d in zip(cpu, dev, strict=True):
        assert_same(c, d)
    assert cpu[-1].error and "blank" in cpu[-1].error  # the device path said the same
    assert sum(r.error is None for r in cpu) == len(paths) - 1
    if reduced:  # the workers really decoded some files at reduced resolution
        reduced_ones = [d for d in dev if d.error is None and d.facts.get("reduce_level", 0) > 0]
        drafted = [d for d in dev if d.error is None and d.facts.get("draft_scale", 1) > 1]
        assert reduced_ones and drafted


def test_both_fingerprints_when_asked(synthetic):
    _, paths = synthetic
    picked = [p for p in paths if p.stem in ("mono2", "j2k-lossless")]
    cpu = [decode_item(*call(p, None, both=True)) for p in picked]
    dev = device_records([call(p, None, both=True) for p in picked])
    for c, d in zip(cpu, dev, strict=True):
        assert_same(c, d)
        if hasattr(d, "fingerprints"):  # what decode_item gives, whatever that is
            assert d.fingerprints() and d.fingerprints() == c.fingerprints()


# -- frames decoded "on the device" ---------------------------------------------------------------


class StandInFrames:
    """The ``FrameDecoder`` contract with OpenJPEG: one tensor per frame (the codestream's own
    signedness, as nvImageCodec gives it), or the reason it was refused."""

    name = "stand-in"
    syntaxes = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless})

    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.refuse = refuse
        self.calls: list[int] = []

    def decode_batch(self, frames, layouts, stream):
        self.calls.append(len(frames))
        out = []
        for i, frame in enumerate(frames):
            if i in self.refuse:
                out.append("stand-in refused it")
                continue
            out.append(torch.from_numpy(openjpeg.decode(np.asarray(frame).tobytes()).copy()))
        return out


FRAME_FILES = [
    "RG1_J2KR.dcm",
    "MR2_J2KR.dcm",
    "693_J2KR.dcm",  # signed, Bits Stored 16
    "MR_small_jp2klossless.dcm",
    "J2K_pixelrep_mismatch.dcm",  # unsigned codestream, Pixel Representation 1: refused
]


def test_frames_decoded_on_the_device_equal_the_full_cpu_decode(tmp_path):
    paths = [real(n) for n in FRAME_FILES]
    decoder = StandInFrames()
    cpu = [decode_item(*call(p, tmp_path / "cpu", reduced=False)) for p in paths]
    dev = device_records(
        [call(p, tmp_path / "dev", reduced=True) for p in paths], frame_decoder=decoder
    )
    assert decoder.calls == [len(paths)]  # one batched call for all the frames
    for name, c, d in zip(FRAME_FILES, cpu, dev, strict=True):
        if name == "J2K_pixelrep_mismatch.dcm":  # refused, then decoded by the workers
            assert "Pixel Representation 1" in d.facts["device_decode_refused"]
            assert d.facts["decoder"] == c.facts["decoder"]
            continue
        assert d.facts["decoder"] == "stand-in" and d.facts["reduce_level"] == 0
        assert_same(
            c,
            d,
            ignore=("pixel_path", "decoder", "decoders_failed", "reduced_fallback"),
            same_fingerprints=False,  # cs1 (never on the host) instead of px1
        )
        if hasattr(d, "fingerprints"):
            assert list(d.fingerprints()) == ["codestream_fingerprint"]


def test_a_refused_frame_is_decoded_by_the_workers_and_says_so(tmp_path):
    paths = [real("MR_small_jp2klossless.dcm"), real("MR2_J2KR.dcm")]
    cpu = [decode_item(*call(p, tmp_path / "cpu")) for p in paths]
    dev = device_records(
        [call(p, tmp_path / "dev") for p in paths], frame_decoder=StandInFrames((1,))
    )
    assert dev[0].facts["decoder"] == "stand-in"
    assert dev[1].facts["device_decode_refused"] == "stand-in refused it"
    assert_same(cpu[1], dev[1], ignore=("pixel_path", "device_decode_refused"))


def test_without_nvimgcodec_frames_go_to_the_cpu_decoders(monkeypatch, tmp_path):
    backend = nvimgcodec.NvImageCodec()
    assert "process that owns the GPU" in backend.unavailable(JPEG2000Lossless)  # a worker
    monkeypatch.setattr(nvimgcodec, "_ENABLED", True)  # the GPU's process
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import fails
    nvimgcodec._library.cache_clear()
    try:
        why = backend.unavailable(JPEG2000Lossless)
        assert why is not None and nvimgcodec.PACKAGE in why
        decoder, reason = nvimgcodec.device_frame_decoder(torch.device("cuda", 0))
        assert decoder is None and nvimgcodec.PACKAGE in reason
    finally:
        nvimgcodec._library.cache_clear()
    checkpoint = untrained_checkpoint(version="device-path")
    proc = DeviceShardProcessor(checkpoint, device="cpu", workers=0)
    assert proc.frame_decoder is None and proc.options.device_syntaxes == frozenset()
    assert "CUDA" in proc.frame_decoder_missing
    path = real("RG1_J2KR.dcm")
    cpu = decode_item(*call(path, tmp_path / "cpu"))
    dev = device_records([call(path, tmp_path / "dev")])[0]
    assert dev.facts["decoder"] == "pillow-j2k-reduce"
    assert_same(cpu, dev)


# -- the worker's half ------------------------------------------------------------------------


def test_workers_hand_over_native_values_or_frames(synthetic):
    _, paths = synthetic
    by_name = {p.stem: p for p in paths}
    options = Options(frozenset({JPEG2000Lossless}))
    native = prepare_item(*_job(by_name["mono2"], options))
    assert native.kind == PIXELS and native.data.dtype == np.uint16 and native.header is not None
    assert "PixelData" not in native.header and "PatientName" not in native.header
    frame = prepare_item(*_job(by_name["j2k-lossless"], options))
    assert frame.kind == FRAME and frame.data.dtype == np.uint8
    cpu_decoded = prepare_item(*_job(by_name["rle"], options))
    assert cpu_decoded.kind == PIXELS and cpu_decoded.facts["decoder"] in ("pylibjpeg", "pydicom")
    done = prepare_item(*_job(real("rtdose_1frame.dcm"), options))
    assert done.kind == DONE or done.error is not None


def _job(path: Path, options: Options) -> tuple:
    c = call(path, None)
    return (c[0], c, options, None, None)


def test_arena_slots_and_handover(synthetic):
    _, paths = synthetic
    slots = arenas.plan([100, None, 5000, 10**9], 64 << 10)
    assert slots[0] == (0, 100) and slots[1] is None and slots[2] == (arenas.ALIGN, 5000)
    assert slots[3] is None  # does not fit: inline
    c = call(paths[0], None)
    with arenas.Arena(8 << 20) as arena:
        item = prepare_item(c[0], c, Options(), arena.name, (4096, 8 << 20))
        assert item.slot == (4096, item.data.nbytes if item.data is not None else item.slot[1])
        assert item.data is None  # it went into the arena
        view = arena.view(4096, item.shape, item.dtype)
        inline = prepare_item(c[0], c, Options())
        assert np.array_equal(view, inline.data)


def test_slot_sizes_come_from_the_header(synthetic):
    _, paths = synthetic
    item = next(iter(scan([paths[0]], b"k")))
    assert buffer_bytes(item.header) == item.header.rows * item.header.columns * 2


# -- the shard processor ------------------------------------------------------------------------


@pytest.mark.parametrize("in_workers", [False, True], ids=["scanned here", "scanned by workers"])
def test_device_shard_processor_rows_equal_shard_processors(synthetic, tmp_path, in_workers):
    """Workers in processes, buffers through a shared-memory arena, two shards in a row (the
    second reuses the other arena): the same rows as ShardProcessor, the same scores; also
    when the device path's workers scan the files they read (arena slots then sized from the
    files' sizes, ``slot_bytes``)."""
    root, _ = synthetic
    checkpoint = untrained_checkpoint(version="device-path", head_std=0.2, calibrate=True)
    items = list(scan([root], b"key"))
    half = len(items) // 2
    with ShardProcessor(checkpoint, device="cpu", workers=2, thumbnails_dir=tmp_path / "a") as p:
        expected = [p.process(items[:half]), p.process(items[half:])]
    given = list(scan([root], b"key", in_workers=True)) if in_workers else items
    with DeviceShardProcessor(
        checkpoint, device="cpu", workers=2, thumbnails_dir=tmp_path / "b", handover="shm"
    ) as p:
        got = [p.collect(p.submit(given[:half])), p.collect(p.submit(given[half:]))]
        assert p.pool.handover == "shm"

    def by_uri(rows):
        return sorted(rows, key=lambda r: r["source_uri"])

    for e, g in zip(expected, got, strict=True):
        assert g.counts == e.counts and by_uri(g.instances) == by_uri(e.instances)
        e.outcomes, g.outcomes = by_uri(e.outcomes), by_uri(g.outcomes)
        e.predictions, g.predictions = by_uri(e.predictions), by_uri(g.predictions)
        for a, b in zip(e.outcomes, g.outcomes, strict=True):
            assert a["reason"] == b["reason"]
            if a.get("facts") is not None:
                assert without(b["facts"], "pixel_path") == without(a["facts"], "pixel_path")
            if a.get("thumbnail_path"):
                assert (
                    Path(b["thumbnail_path"]).read_bytes() == Path(a["thumbnail_path"]).read_bytes()
                )
        for a, b in zip(e.predictions, g.predictions, strict=True):
            assert a["score"] == b["score"]  # same model inputs, same batches, same threads
            assert a["sop_instance_uid"] == b["sop_instance_uid"]


def test_the_path_is_chosen_from_the_device():
    assert resolve_pixel_path("auto", "cuda") == "device"
    assert resolve_pixel_path("auto", "cpu") == "cpu"
    assert resolve_pixel_path("device", "cpu") == "device"
    with pytest.raises(ValueError, match="pixel path"):
        resolve_pixel_path("gpu", "cpu")
    checkpoint = untrained_checkpoint(version="device-path")
    assert type(shard_processor(checkpoint, device="cpu", workers=0)) is ShardProcessor
    forced = shard_processor(checkpoint, pixel_path="device", device="cpu", workers=0)
    assert isinstance(forced, DeviceShardProcessor)


def test_no_room_for_an_arena_means_inline_buffers(synthetic, monkeypatch, tmp_path):
    """A /dev/shm too small for the shard (a container's default 64 MB, say): the buffers
    travel through the pool instead, with the same results."""
    _, paths = synthetic

    def no_room(size):
        raise OSError("no room")

    monkeypatch.setattr(arenas, "_check_room", no_room)
    calls = [call(p, tmp_path / "dev") for p in paths[:3]]
    pixels = DevicePixels(SPEC, torch.device("cpu"))
    with DevicePool(0, pixels, Options(), handover="shm") as pool:
        pool.headers = {it.uri: it.header for it in scan(paths[:3], b"k")}
        got = pool.decode_all(calls)
        assert pool.handover == "inline"
    for c, d in zip([decode_item(*call(p, tmp_path / "cpu")) for p in paths[:3]], got, strict=True):
        assert_same(c, d)
