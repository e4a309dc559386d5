"""The fast path gives the simple path's scores.

Fast: the screening path (``ShardProcessor``: spawn process pool, chunked shards, batched
inference, reduced-resolution decoding where the syntax allows it). Simple: one file at a time
in this process, full decoding, batch size 1.

Scores agree within 1e-5 (batched vs batch-1 convolution arithmetic) when both paths decode
the same way. Reduced-resolution decoding (JPEG 2000, baseline JPEG) is a change of pixels, not
of arithmetic: its images stay within a mean 1% of the range of the full decode (checked here;
the edge-by-edge bounds are in tests/tasks/test_pixels.py). What that does to a score depends
on the model: an untrained network reacts to pixel texture far more than a trained one, so the
score bound for reduced decoding (0.02) is measured by benchmarks/bench_pipeline.py with the
model given to it, not asserted with a random network here.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.checkpoint import untrained_checkpoint
from model.predictor import Predictor
from tasks.dicom import pixels as px
from tasks.dicom import synth
from tasks.ingest import scan
from tasks.screening import ShardProcessor

EXACT = ["explicit_le", "rle", "jpeg_ls", "explicit_be"]
REDUCED = ["j2k_lossless", "jpeg_baseline"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_path")
    for i, syntax in enumerate(EXACT + REDUCED):
        for photometric in ("MONOCHROME1", "MONOCHROME2"):
            params = synth.ImageParams(
                rows=700,
                columns=640,
                bits_stored=8 if syntax in synth.EIGHT_BIT_ONLY else 12,
                syntax=syntax,
                photometric=photometric,
                window_scale=0.8 if photometric == "MONOCHROME1" else 1.1,  # one clips
            )
            synth.write_image(
                root / f"{syntax}-{photometric}.dcm",
                params,
                positive=bool(i % 2),
                seed=11,
                study=i,
                instance=int(photometric == "MONOCHROME1"),
            )
    return root


@pytest.fixture(scope="module")
def checkpoint():
    return untrained_checkpoint(version="fast-path", head_std=0.2, calibrate=True)


def test_calibrated_untrained_model_scores_depend_on_pixels(corpus, checkpoint):
    images = np.stack([px.preprocess(p, checkpoint.preprocessing).image for p in _files(corpus)])
    scores = Predictor(checkpoint, device="cpu").predict(images)
    assert scores.std() > 0.05, scores  # the equivalence below would be vacuous otherwise
    flat = untrained_checkpoint(version="flat")
    assert np.ptp(Predictor(flat, device="cpu").predict(images)) < 1e-4


def _files(root):
    return sorted(root.glob("*.dcm"))


def test_fast_path_equals_simple_path(corpus, checkpoint):
    spec = checkpoint.preprocessing
    simple_predictor = Predictor(checkpoint, device="cpu")
    simple, full_images = {}, {}
    for path in _files(corpus):
        reduced = path.name.split("-")[0] in REDUCED
        pre = px.preprocess(path, spec, reduced=reduced)
        simple[path.name] = float(simple_predictor.predict(pre.image[None], batch_size=1)[0])
        full = px.preprocess(path, spec, reduced=False).image
        full_images[path.name] = (full, pre.image)

    items = list(scan([corpus], b"fast-path-key"))
    with ShardProcessor(checkpoint, device="cpu", workers=2, batch_size=5, reduced=True) as proc:
        rows = proc.process(items)
    assert rows.counts["predicted"] == len(simple), rows.reasons
    fast = {p["source_uri"].rsplit("/", 1)[-1]: p["score"] for p in rows.predictions}
    assert fast.keys() == simple.keys()
    for name, score in fast.items():
        assert abs(score - simple[name]) <= 1e-5, (name, score, simple[name])

    decoded = {
        o["source_uri"].rsplit("/", 1)[-1]: o["facts"]["decoded_shape"] for o in rows.outcomes
    }
    for name, shape in decoded.items():
        full, used = full_images[name]
        if name.split("-")[0] in REDUCED:
            assert max(shape) < 700, (name, shape)  # really decoded at a reduced resolution
            # normalised images: std 0.25 per unit of the [0, 1] range
            assert float(np.abs(full - used).mean()) * 0.25 < 0.01, name
        else:
            assert shape == [700, 640], (name, shape)
            assert np.array_equal(full, used), name


def test_pool_leaves_one_inference_thread_and_restores_the_setting(corpus, checkpoint):
    """Beside busy decode workers torch's spinning intra-op threads stall each other; the
    processor lowers them for its lifetime and puts the caller's setting back."""
    import torch

    from tasks.decode_pool import available_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with ShardProcessor(checkpoint, device="cpu", workers=available_cores()) as proc:
            assert torch.get_num_threads() == 1
            proc.process(list(scan([corpus], b"fast-path-key"))[:2])
        assert torch.get_num_threads() == 3
        with ShardProcessor(checkpoint, device="cpu", workers=0):
            assert torch.get_num_threads() == 3  # no pool: inference may use every core
    finally:
        torch.set_num_threads(before)


_MMAPPED_BYTES_AFTER_MALLOC = """
import ctypes, sys
from tasks.ingest import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(8 << 20)  # one 8 MB image buffer
print(libc.mallinfo2().hblkhd - before)
libc.free(ctypes.c_void_p(block))
"""


def test_decode_workers_keep_freed_buffers_on_glibc():
    """The effect, not the return value: with it an 8 MB buffer comes from the heap (reused
    after free), without it from a fresh mmap (mallinfo2's hblkhd counts mmapped bytes)."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        from tasks.ingest import keep_freed_memory

        assert keep_freed_memory() is False
        return

    def mmapped(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _MMAPPED_BYTES_AFTER_MALLOC, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())

    assert mmapped("default") >= 8 << 20
    assert mmapped("keep") == 0


@pytest.mark.parametrize(
    ("cores", "cpu_workers", "threads", "gpu_workers"),
    [(1, 1, 1, 1), (2, 2, 1, 2), (4, 4, 1, 4), (8, 7, 2, 8), (16, 14, 3, 16)],
)
def test_cores_split_between_decode_workers_and_inference(
    monkeypatch, cores, cpu_workers, threads, gpu_workers
):
    """On the CPU about one core in five is left to inference (the measured cost ratio of a
    2000 px image: ~25 ms decoding, ~6.5 ms scoring); with a GPU every core decodes."""
    import torch

    from tasks import decode_pool, screening

    monkeypatch.setattr(decode_pool, "available_cores", lambda: cores)
    assert decode_pool.default_workers("cpu") == cpu_workers
    assert decode_pool.default_workers("cuda") == gpu_workers
    predictor = Predictor(untrained_checkpoint(), device="cpu")
    before = torch.get_num_threads()
    try:
        assert screening.limit_inference_threads(predictor, cpu_workers) == before
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


# --- the decode pool: a crash is pinned on the file that caused it ---------------------------

CRASHER = "crash-me"


def _decode_or_crash(src, *_args):
    """A stand-in decoder (module-level: the spawned workers import it) that kills its process
    on one file, as a codec fault or the out-of-memory killer would."""
    import os

    from tasks.ingest import Decoded

    if CRASHER in src.uri:
        os._exit(3)
    return Decoded(src.uri, content_sha256=f"pid-{os.getpid()}")


def _decode_chunk_or_crash(args):
    return [_decode_or_crash(*a) for a in args]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_decoder_crash_fails_only_its_file_and_the_pool_goes_on(workers):
    from tasks.decode_pool import CRASH_REASON, DecodePool
    from tasks.dicom.discovery import SourceFile

    def job(tag: str, crash_at: int | None) -> list[tuple]:
        uris = [f"{tag}-{i}{'-' + CRASHER if i == crash_at else ''}" for i in range(12)]
        return [(SourceFile(uri=u, path=u), "1.2.3", {}, True, None) for u in uris]

    with DecodePool(workers, decode=_decode_or_crash, decode_chunk=_decode_chunk_or_crash) as pool:
        assert pool.chunk_size(12) == -(-12 // (workers * 4))  # several chunks per worker
        first, second = job("a", crash_at=7), job("b", crash_at=None)
        # Two jobs in flight at once (as the shard loop has them): the crash in the first
        # breaks the processes both were given to.
        running = [pool.start(first), pool.start(second)]
        out = [list(pool.results(j)) for j in running]
        again = pool.decode_all(job("c", crash_at=None))  # the pool still works afterwards
    assert [d.uri for d in out[0]] == [a[0].uri for a in first]  # in order, none lost
    assert [d.error for d in out[0]] == [None] * 7 + [CRASH_REASON] + [None] * 4
    assert [d.uri for d in out[1]] == [a[0].uri for a in second]
    assert all(d.error is None for d in out[1] + again)
    assert len(again) == 12


def test_an_in_process_pool_decodes_in_order_without_processes():
    import os

    from tasks.decode_pool import DecodePool
    from tasks.dicom.discovery import SourceFile

    args = [(SourceFile(uri=f"x-{i}", path=f"x-{i}"), "1.2.3", {}, True, None) for i in range(5)]
    with DecodePool(0, decode=_decode_or_crash, decode_chunk=_decode_chunk_or_crash) as pool:
        out = pool.decode_all(args)
    assert [d.uri for d in out] == [f"x-{i}" for i in range(5)]
    assert {d.content_sha256 for d in out} == {f"pid-{os.getpid()}"}
    with pytest.raises(ValueError, match="-1 workers is invalid"):
        DecodePool(-1)
