"""Decode + preprocess throughput per transfer syntax: full vs reduced decoding, 1 vs N processes.

    .venv/bin/python benchmarks/bench_decode.py            # ~2000 px images, 3 per syntax
    .venv/bin/python benchmarks/bench_decode.py --plugins  # also time every decoder backend

Writes synthetic radiographs (tasks.dicom.synth) to a temporary folder (or --dir, reused when it
already holds them), then times ``tasks.dicom.pixels.preprocess`` (150 px model input) on them. One
line per configuration; the last line gives speed-ups over full decoding (target: JPEG 2000 >= 10x).
``reduced`` is the default (decoded image >= 2x the model input); ``reduced-m1`` the smallest
resolution level that still covers the input (faster, less accurate: see tasks/dicom/pixels.py).
Numbers depend on the machine and its load; compare lines from one run only.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pydicom

from model.spec import PreprocessSpec
from tasks.dicom import synth
from tasks.dicom.decoders import REGISTRY, DecodeJob
from tasks.dicom.pixels import DEFAULT_MAX_PIXELS, check_image, preprocess, transfer_syntax

REDUCIBLE = ("j2k_lossless", "j2k", "jpeg_baseline")
MODES = {  # name: preprocess keywords
    "full": {"reduced": False},
    "reduced": {"reduced": True},  # default margin: >= 2 x input_size decoded pixels
    "reduced-m1": {"reduced": True, "reduce_margin": 1.0},  # smallest image covering the input
}
DEFAULT_SYNTAXES = (
    "explicit_le",
    "deflated_le",
    "rle",
    "jpeg_baseline",
    "jpeg_lossless_sv1",
    "jpeg_ls",
    "jpeg_ls_near",
    "j2k_lossless",
    "j2k",
)


def make_images(folder: Path, syntax: str, n: int, size: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / syntax / f"{i}.dcm"
        if not path.exists():
            bits = 8 if syntax in synth.EIGHT_BIT_ONLY else 12 + i % 3
            params = synth.ImageParams(
                rows=size,
                columns=int(size * 0.9),
                bits_stored=bits,
                photometric=("MONOCHROME1", "MONOCHROME2")[i % 2],
                syntax=syntax,
                modality="CR",
            )
            synth.write_image(path, params, positive=bool(i % 2), seed=100 + i)
        paths.append(path)
    return paths


def time_one_process(paths: list[Path], spec: PreprocessSpec, options: dict) -> float:
    preprocess(paths[0], spec, **options)  # warm caches / imports
    start = time.perf_counter()
    for p in paths:
        preprocess(p, spec, **options)
    return len(paths) / (time.perf_counter() - start)


def time_pool(
    pool: ProcessPoolExecutor, workers: int, paths: list[Path], spec: PreprocessSpec, options: dict
) -> float:
    jobs = paths * 2  # keep every worker busy
    work = functools.partial(preprocess, spec=spec, **options)
    list(pool.map(work, (paths * workers)[:workers]))  # warm the workers
    start = time.perf_counter()
    list(pool.map(work, jobs))
    return len(jobs) / (time.perf_counter() - start)


def time_backends(paths: list[Path], syntax: str) -> None:
    """Full-resolution decode time of every registered backend for the syntax (the registry's
    order, ``tasks/dicom/decoders/registry.py``, should list the fastest first)."""
    ds, uid = transfer_syntax(pydicom.dcmread(paths[0]), {})
    layout, _ = check_image(ds, uid, DEFAULT_MAX_PIXELS)
    for backend in REGISTRY.handling(uid, reduced=False):
        head = f"backend syntax={syntax:18s} backend={backend.name:10s}"
        why = backend.unavailable(uid)
        if why is not None:
            print(f"{head} unavailable: {why}")
            continue
        try:
            backend.decode(DecodeJob(ds, uid, layout))
            start = time.perf_counter()
            for _ in range(2):
                backend.decode(DecodeJob(ds, uid, layout))
            ms = (time.perf_counter() - start) / 2 * 1000
            print(f"{head} decode_ms={ms:8.1f}")
        except Exception as exc:  # a benchmark line, not a pipeline outcome
            print(f"{head} failed: {exc}".splitlines()[0])
    order = [b.name for b in REGISTRY.pick(uid, reduced=False)[0]]
    print(f"backend syntax={syntax:18s} order={','.join(order)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2000, help="image rows (columns are 90%%)")
    ap.add_argument("--images", type=int, default=3, help="images per transfer syntax")
    ap.add_argument("--workers", type=int, default=2, help="process pool size (spawn)")
    ap.add_argument("--syntaxes", default=",".join(DEFAULT_SYNTAXES), help="comma-separated")
    ap.add_argument("--dir", type=Path, default=None, help="keep/reuse the images here")
    ap.add_argument("--plugins", action="store_true", help="also time each decoder backend")
    args = ap.parse_args(argv)
    syntaxes = [s for s in args.syntaxes.split(",") if s]
    spec = PreprocessSpec()

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bench_decode_")
    folder = args.dir or Path(tmp.name)
    start = time.perf_counter()
    images = {s: make_images(folder, s, args.images, args.size) for s in syntaxes}
    print(
        f"# {args.images} image(s) per syntax, {args.size}x{int(args.size * 0.9)} px, "
        f"model input {spec.input_size} px; images ready in {time.perf_counter() - start:.1f} s"
    )

    rates: dict[tuple[str, str, int], float] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        for syntax in syntaxes:
            paths = images[syntax]
            if args.plugins:
                time_backends(paths, syntax)
            for mode in MODES if syntax in REDUCIBLE else ("full",):
                options = MODES[mode]
                facts = preprocess(paths[0], spec, **options).facts
                how = facts["decoder"]
                if facts["reduce_level"]:
                    how += f" k={facts['reduce_level']}"
                if facts["draft_scale"] > 1:
                    how += f" scale=1/{facts['draft_scale']}"
                for workers in (1, args.workers):
                    if workers == 1:
                        rate = time_one_process(paths, spec, options)
                    else:
                        rate = time_pool(pool, args.workers, paths, spec, options)
                    rates[(syntax, mode, workers)] = rate
                    print(
                        f"syntax={syntax:18s} mode={mode:10s} workers={workers} "
                        f"images/s={rate:7.2f} ms/image={1000 / rate:8.1f} decoder={how}",
                        flush=True,
                    )
    ratios = []
    for syntax in syntaxes:
        for mode in ("reduced", "reduced-m1"):
            for workers in (1, args.workers):
                full = rates.get((syntax, "full", workers))
                red = rates.get((syntax, mode, workers))
                if full and red:
                    ratios.append(f"{syntax}:{mode}/{workers}p={red / full:.1f}x")
    print("ratio vs full: " + (" ".join(ratios) if ratios else "n/a (no reducible syntax)"))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
