"""How far reduced-resolution JPEG 2000 decoding moves pixels and probabilities, per margin.

    python benchmarks/bench_reduced_margin.py --model demo/model.pt

Generates ``--n`` distinct ~2000 px 12-bit CR images as JPEG 2000 lossless (the pipeline
benchmark's base images), preprocesses each fully and at reduced resolution for several
``reduce_margin`` values (with and without the 256 px review thumbnail, which may force a
larger level), and prints per margin: ms per image in this one process, the decoded shapes,
the mean and max absolute pixel difference of the [0, 1] model input against the full decode,
and the mean and max probability difference under the given model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="checkpoint (a trained one)")
    ap.add_argument("--n", type=int, default=12, help="distinct images")
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--margins", type=float, nargs="+", default=[4.0, 2.0, 1.5, 1.0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cxr-bench")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))

    import numpy as np
    from bench_pipeline import make_corpus

    from model.checkpoint import load_checkpoint
    from model.predictor import Predictor
    from tasks.dicom import pixels as px

    corpus = make_corpus(
        args.dir / f"margin-j2k-{args.n}-{args.size}", args.n, args.size, "j2k_lossless", args.n
    )
    files = sorted(corpus.rglob("*.dcm"))
    ckpt = load_checkpoint(args.model)
    predictor = Predictor(ckpt, device="cpu")
    spec = ckpt.preprocessing

    started = time.perf_counter()
    full = np.stack([px.preprocess(f, spec, reduced=False).image for f in files])
    full_ms = (time.perf_counter() - started) / len(files) * 1000
    p_full = predictor.predict(full)
    print(f"full decode: {full_ms:.0f} ms/image; scores {np.round(p_full, 3).tolist()}")
    for margin in args.margins:
        for thumb in (None, 256):
            started = time.perf_counter()
            res = [
                px.preprocess(f, spec, reduced=True, reduce_margin=margin, thumbnail_size=thumb)
                for f in files
            ]
            ms = (time.perf_counter() - started) / len(files) * 1000
            images = np.stack([r.image for r in res])
            pixels = np.abs(images - full) * spec.std[0]  # back to the [0, 1] windowed range
            dp = np.abs(predictor.predict(images) - p_full)
            shapes = sorted({tuple(r.facts["decoded_shape"]) for r in res})
            print(
                f"margin {margin:3.1f} thumbnail {thumb or '-':>3}: {ms:5.0f} ms/image "
                f"({full_ms / ms:4.1f}x), decoded {shapes}, pixels |d| mean "
                f"{pixels.mean():.4f} max {pixels.max():.3f}, probability |d| mean "
                f"{dp.mean():.4f} max {dp.max():.4f}"
            )


if __name__ == "__main__":
    main()
