"""The two pixel paths per image on a CPU: where the work goes, ms per image.

    python benchmarks/bench_device_path.py                   # 8 images, 2000 x 1840, 12-bit
    python benchmarks/bench_device_path.py --syntax j2k_lossless --n 4

On one generated corpus (single-frame CR, MONOCHROME1 and 2 alternating, explicit VR LE by
default), in this process, best of ``--rounds``:

* ``cpu path``: ``tasks.ingest.decode_item`` per file, what a decode worker does today (read,
  hash, parse, decode, fingerprint, window, one-pass box means, thumbnail JPEG);
* ``device path, workers``: ``tasks.device.prepare.prepare_item`` per file, what a decode worker
  does on the device path (read, hash, parse, decode what a CPU must, fingerprint, hand over);
* ``device path, owner``: ``tasks.device.pipeline.DevicePixels`` rendering all the files in one
  batch, in torch on this CPU, split into its steps (stage, count, tables, render): ``tables``
  is the per-image host work the GPU's owner does on any machine; ``stage``, ``count`` and
  ``render`` are the device's work, timed here on a CPU only to show that the same code runs
  (on a GPU they are microseconds per image; ``benchmarks/bench_gpu_e2e.py`` measures them).

The number that matters for a GPU machine is the worker CPU per image: with 16 cores the
workers' rate is 16 / (worker ms) images per ms. Ends with a RESULT line.
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_corpus(out: Path, n: int, rows: int, syntax: str) -> list[Path]:
    from tasks.dicom import synth

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"{syntax}-{rows}-{i}.dcm"
        if not path.exists():
            params = synth.ImageParams(
                rows=rows,
                columns=int(rows * 0.92),
                bits_stored=12,
                syntax=syntax,
                modality="CR",
                photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                window_scale=0.8 if i % 3 == 2 else 1.1,  # one in three clips: no straight line
            )
            synth.write_image(path, params, positive=bool(i % 2), seed=42, study=i)
        paths.append(path)
    return paths


def call(path: Path, thumbs: Path) -> tuple:
    from model.spec import PreprocessSpec
    from tasks.dicom.discovery import SourceFile
    from tasks.ingest import decode_item

    src = SourceFile(uri=str(path), path=str(path))
    bound = inspect.signature(decode_item).bind(
        src,
        f"1.2.3.{abs(hash(path.name)) % 10**8}",
        PreprocessSpec().to_dict(),
        reduced=True,
        thumbnails_dir=str(thumbs),
    )
    return bound.args


def hash_inputs(c: tuple) -> tuple:
    """A file's bytes and, for native data, its stored values (read outside the timing)."""
    import numpy as np

    from tasks.dicom import pixels as px

    data = c[0].read_bytes()
    ds = px.read_dataset(data)
    tsyntax = ds.file_meta.TransferSyntaxUID
    layout, photometric = px.check_image(ds, tsyntax, px.DEFAULT_MAX_PIXELS)
    stored = None
    if not tsyntax.is_encapsulated:
        stored = np.frombuffer(ds.PixelData, dtype=layout.stored_dtype())
        stored = stored.reshape(layout.rows, layout.columns)
    return data, ds, layout, photometric, stored


def hash_only(inputs: tuple) -> None:
    """What both paths spend on identity per file: the file's sha256 (tasks.ingest) and the
    content fingerprint (tasks.dicom.fingerprint): px1 of the stored values for native data,
    cs1 of the codestream for a frame decoded at reduced resolution or on the GPU."""
    import hashlib

    from tasks.dicom import fingerprint

    data, ds, layout, photometric, stored = inputs
    hashlib.sha256(data).hexdigest()
    if stored is not None:
        fingerprint.of_pixels(ds, layout, photometric, stored)
    else:
        fingerprint.of_codestream(ds, layout, photometric)


def best_ms(fn, calls: list, rounds: int) -> tuple[float, float]:
    """(best, median) ms per call over ``rounds`` rounds of every call."""
    per = []
    for _ in range(rounds):
        started = time.perf_counter()
        for c in calls:
            fn(c)
        per.append(1000 * (time.perf_counter() - started) / len(calls))
    return min(per), statistics.median(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=2000, help="rows (columns are 0.92 of it)")
    ap.add_argument("--syntax", default="explicit_le")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cxr-bench-device")
    args = ap.parse_args()

    import os

    import torch

    from model.spec import PreprocessSpec
    from tasks.device.pipeline import DevicePixels
    from tasks.device.prepare import Options, prepare_item
    from tasks.ingest import decode_item, keep_freed_memory

    keep_freed_memory()  # as the decode workers run
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(
        f"# {platform.machine()} cores={os.cpu_count()} python {platform.python_version()} "
        f"torch {torch.__version__} load {load:.2f}"
    )
    paths = make_corpus(args.dir, args.n, args.size, args.syntax)
    thumbs = args.dir / "thumbs"
    calls = [call(p, thumbs) for p in paths]
    print(f"corpus: {len(paths)} x {args.size} x {int(args.size * 0.92)} px {args.syntax}")

    for c in calls[:2]:  # warm up imports and caches
        decode_item(*c)
        prepare_item(c[0], c, Options())
    failed = [r.error for r in (decode_item(*c) for c in calls) if r.error]
    assert not failed, failed
    # the two interleaved, round after round: the machine's load drifts
    cpu_rounds, dev_rounds, hash_rounds = [], [], []
    items: list = []
    inputs = [hash_inputs(c) for c in calls]
    for _ in range(args.rounds):
        cpu_rounds.append(best_ms(lambda c: decode_item(*c), calls, 1)[0])
        items.clear()
        dev_rounds.append(
            best_ms(lambda c: items.append(prepare_item(c[0], c, Options())), calls, 1)[0]
        )
        hash_rounds.append(best_ms(hash_only, inputs, 1)[0])
    del inputs
    cpu_best, cpu_median = min(cpu_rounds), statistics.median(cpu_rounds)
    dev_best, dev_median = min(dev_rounds), statistics.median(dev_rounds)
    hashing = min(hash_rounds)
    print(f"cpu path            {cpu_best:7.1f} ms/image  (median {cpu_median:.1f}; decode_item)")
    print(
        f"device path worker  {dev_best:7.1f} ms/image  (median {dev_median:.1f}; "
        "prepare_item: read, hash, parse, decode, fingerprint, hand over)"
    )
    print(
        f"  of which hashing  {hashing:7.1f} ms/image  (in both paths: sha256 of the file "
        "and the content fingerprint, tasks.ingest / tasks.dicom.fingerprint)"
    )
    assert all(i.error is None for i in items), [i.error for i in items]
    from tasks.dicom.decoders.nvimgcodec import SYNTAXES

    syntax = items[0].facts.get("transfer_syntax")
    if syntax in SYNTAXES:  # what a worker does when the GPU's owner decodes these frames
        frame_options = Options(frozenset({syntax}))
        handover = min(
            best_ms(lambda c: prepare_item(c[0], c, frame_options), calls, 1)[0]
            for _ in range(args.rounds)
        )
        print(
            f"device path worker  {handover:7.1f} ms/image  with a GPU decoder (the frame "
            "handed over undecoded; cs1 fingerprint of the codestream)"
        )

    spec = PreprocessSpec()
    splits = []
    for _ in range(args.rounds):
        pixels = DevicePixels(spec, torch.device("cpu"), batch_size=len(items), profile=True)
        rendered = list(pixels.render(list(enumerate(items)), lambda it: it.data))
        assert sum(len(r.positions) for r in rendered) == len(items)
        splits.append({k: 1000 * v / len(items) for k, v in pixels.timings.items()})
    best = {k: min(s[k] for s in splits) for k in splits[0]}
    print(
        "device path owner   "
        + ", ".join(f"{k} {best[k]:.2f}" for k in ("stage", "count", "tables", "render"))
        + " ms/image  (torch on this CPU; 'tables' is host work on any machine)"
    )
    ratio = cpu_best / dev_best
    print(
        f"worker CPU per image: cpu path {cpu_best:.1f} ms, device path {dev_best:.1f} ms "
        f"({ratio:.2f}x less); owner host work {best['tables']:.2f} ms/image"
    )
    rest_cpu, rest_dev = cpu_best - hashing, dev_best - hashing
    print(
        f"without the hashing: cpu path {rest_cpu:.1f} ms, device path worker {rest_dev:.1f} ms "
        f"({rest_cpu / max(rest_dev, 1e-9):.2f}x less)"
    )
    print(
        f"RESULT cpu_path_ms={cpu_best:.1f} device_worker_ms={dev_best:.1f} "
        f"hashing_ms={hashing:.1f} "
        f"worker_ratio={ratio:.2f} owner_tables_ms={best['tables']:.2f} "
        f"torch_cpu_render_ms={best['render'] + best['count'] + best['stage']:.1f}"
    )


if __name__ == "__main__":
    main()
