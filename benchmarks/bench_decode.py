"""Decode + preprocess throughput per transfer syntax: full vs reduced decoding, 1 vs N processes.

    .venv/bin/python benchmarks/bench_decode.py            # ~2000 px images, 3 per syntax
    .venv/bin/python benchmarks/bench_decode.py --plugins  # also time every decoder backend
    .venv/bin/python benchmarks/bench_decode.py --compare-with 71f93ea  # outputs vs a revision

Writes synthetic radiographs (tasks.dicom.synth) to a temporary folder (or --dir, reused when it
already holds them), then times ``tasks.dicom.pixels.preprocess`` (150 px model input) on them. One
line per configuration; the last line gives speed-ups over full decoding (target: JPEG 2000 >= 10x).
``reduced`` is the default (decoded image >= 2x the model input); ``reduced-m1`` the smallest
resolution level that still covers the input (faster, less accurate: see tasks/dicom/pixels.py).
Numbers depend on the machine and its load; compare lines from one run only.

``--compare-with REV`` times nothing: it runs this tree's ``preprocess`` and the one of
``tasks/dicom/pixels.py`` at git revision ``REV`` on varied synthetic images (sizes 180-2600 px,
8-16 bits, signed, rescale, clipping and wide LINEAR / LINEAR_EXACT / SIGMOID windows,
percentiles, VOI LUT) and prints the largest and mean differences of the model inputs ([0, 1]
units) and thumbnails (grey levels), each also against float64 arithmetic on every pixel
followed by an area resize (Pillow's BOX filter in float32 mode, as tests/tasks/dicom does).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from model.spec import PreprocessSpec
from tasks.dicom import pixels, synth
from tasks.dicom.decoders import REGISTRY, DecodeJob, decode
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


def pixels_at(rev: str):
    """``tasks/dicom/pixels.py`` as it was at git revision ``rev``, as a module."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:tasks/dicom/pixels.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = f"pixels_at_{rev}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:tasks/dicom/pixels.py", "exec"), module.__dict__)
    return module


def comparison_images(folder: Path) -> list[tuple[str, Path | pydicom.Dataset]]:
    """(name, file or data set) for :func:`compare_with`: the kinds of window the pixel path
    treats differently, at sizes where the model input and thumbnail shrink or enlarge."""
    rng = np.random.default_rng(7)
    out: list[tuple[str, Path | pydicom.Dataset]] = []
    cases = [
        ("wide LINEAR", {"window_scale": 1.3}),
        ("clipping LINEAR", {"window_scale": 0.7}),
        ("wide LINEAR_EXACT", {"window_scale": 1.2, "voi_function": "LINEAR_EXACT"}),
        ("clipping LINEAR_EXACT", {"window_scale": 0.8, "voi_function": "LINEAR_EXACT"}),
        ("SIGMOID", {"window_scale": 1.0, "voi_function": "SIGMOID"}),
        ("percentile", {"window": False}),
        ("rescale+window", {"rescale": (0.5, -1024.0), "window_scale": 1.1}),
        ("signed 16-bit", {"bits_stored": 16, "signed": True, "window_scale": 0.9}),
        ("8-bit", {"bits_stored": 8, "window_scale": 1.2}),
    ]
    sizes = [(2000, 1840), (2600, 2140), (1001, 877), (480, 400), (181, 150)]
    for i, (name, changes) in enumerate(cases):
        for j, (rows, cols) in enumerate(sizes):
            if (i + j) % 2 and rows < 2000:
                continue  # keep the run short: every case at the large sizes, half at others
            params = synth.ImageParams(
                rows=rows,
                columns=cols,
                photometric=("MONOCHROME1", "MONOCHROME2")[(i + j) % 2],
                **{"bits_stored": 12, **changes},
            )
            path = folder / "compare" / f"{i}-{j}.dcm"
            synth.write_image(path, params, positive=bool(j % 2), seed=int(rng.integers(1000)))
            out.append((f"{name} {rows}x{cols}", path))
    # a VOI LUT Sequence (a gamma curve over the data's range)
    ds = pydicom.dcmread(out[0][1])
    stored = ds.pixel_array.astype(np.int64)
    low, high = int(stored.min()), int(stored.max())
    curve = (((np.arange(high - low + 1) / (high - low)) ** 0.6) * 4095).astype(np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [len(curve), low, 12]
    item.LUTData = curve.tolist()
    ds.VOILUTSequence = [item]
    out.append(("VOI LUT 2000x1840", ds))
    return out


def _reference(module, src, spec: PreprocessSpec, shapes) -> list[np.ndarray]:
    """float64 display values of every pixel (this tree's transforms, unquantised), area-resized
    with Pillow's BOX filter in float32 mode."""
    ds = module.read_dataset(src)
    ds, tsyntax = module.transfer_syntax(ds, {})
    layout, photometric = module.check_image(ds, tsyntax, DEFAULT_MAX_PIXELS)
    stats = module.StoredValues(decode(ds, tsyntax, layout).array, layout)
    modality = module.modality_transform(ds, layout)
    voi = module.voi_transform(ds, spec, modality, stats)
    invert, _ = module.inversion(ds, photometric)
    table = module.display_table(stats, modality, voi, invert)
    full = Image.fromarray(np.take(table, stats.index).astype(np.float32))
    return [
        np.asarray(full.resize((c, r), Image.Resampling.BOX), dtype=np.float64) for r, c in shapes
    ]


def compare_with(rev: str, folder: Path) -> None:
    old = pixels_at(rev)
    spec = PreprocessSpec()
    size = spec.input_size
    worst: dict[str, list[float]] = {}

    def add(key: str, diff: np.ndarray) -> None:
        worst.setdefault(key, [0.0, 0.0, 0])  # type: ignore[list-item]
        entry = worst[key]
        entry[0] = max(entry[0], float(np.abs(diff).max()))
        entry[1] += float(np.abs(diff).sum())
        entry[2] += diff.size

    print(f"# this tree vs tasks/dicom/pixels.py at {rev}; model input {size} px, thumbnail 256")
    for name, src in comparison_images(folder):
        new_pre = preprocess(src, spec, thumbnail_size=256)
        old_pre = old.preprocess(src, spec, thumbnail_size=256)
        tshape = new_pre.thumbnail.shape
        ref_model, ref_thumb = _reference(pixels, src, spec, [(size, size), tshape])
        new_unit = new_pre.image[0] * spec.std[0] + spec.mean[0]
        old_unit = old_pre.image[0] * spec.std[0] + spec.mean[0]
        ref_u8 = np.clip(np.rint(ref_thumb * 255.0), 0, 255)
        diffs = {
            "model new-old": new_unit - old_unit,
            "model new-float64": new_unit - ref_model,
            "model old-float64": old_unit - ref_model,
            "thumb new-old": new_pre.thumbnail.astype(float) - old_pre.thumbnail,
            "thumb new-float64": new_pre.thumbnail.astype(float) - ref_u8,
            "thumb old-float64": old_pre.thumbnail.astype(float) - ref_u8,
        }
        for key, diff in diffs.items():
            add(key, diff)
        linear = new_pre.facts.get("window_linear")
        print(
            f"{name:28s} linear={linear!s:5s} "
            f"model max|new-old|={np.abs(diffs['model new-old']).max():.2e} "
            f"max|new-f64|={np.abs(diffs['model new-float64']).max():.2e} "
            f"max|old-f64|={np.abs(diffs['model old-float64']).max():.2e}  "
            f"thumb max|new-old|={np.abs(diffs['thumb new-old']).max():.0f} "
            f"mean={np.abs(diffs['thumb new-old']).mean():.3f} levels"
        )
    for key, (biggest, total, count) in worst.items():
        unit = "grey levels" if key.startswith("thumb") else "[0, 1]"
        print(f"overall {key:18s} max {biggest:.3g} mean {total / count:.3g} ({unit})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2000, help="image rows (columns are 90%%)")
    ap.add_argument("--images", type=int, default=3, help="images per transfer syntax")
    ap.add_argument("--workers", type=int, default=2, help="process pool size (spawn)")
    ap.add_argument("--syntaxes", default=",".join(DEFAULT_SYNTAXES), help="comma-separated")
    ap.add_argument("--dir", type=Path, default=None, help="keep/reuse the images here")
    ap.add_argument("--plugins", action="store_true", help="also time each decoder backend")
    ap.add_argument("--compare-with", metavar="REV", help="compare outputs with git revision REV")
    args = ap.parse_args(argv)
    if args.compare_with:
        with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
            compare_with(args.compare_with, Path(tmp))
        return
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
