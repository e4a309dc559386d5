"""Where a decode worker's time goes for one image: cProfile of ``tasks.ingest.decode_item``.

    python benchmarks/profile_decode.py                     # 2000 x 1840, 12-bit, explicit VR LE
    python benchmarks/profile_decode.py --syntax j2k_lossless --calls 12

Generates one synthetic CR image, sets the allocator up as the decode workers do
(``keep_freed_memory``), warms up, then prints ms per call with and without the review
thumbnail and the functions that took the most time (total over ``--calls`` calls).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--syntax", default="explicit_le")
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    from model.checkpoint import untrained_checkpoint
    from tasks.dicom import synth
    from tasks.dicom.discovery import SourceFile
    from tasks.ingest import decode_item, keep_freed_memory

    keep_freed_memory()
    work = Path(tempfile.mkdtemp(prefix="profile-decode-"))
    path = work / "image.dcm"
    params = synth.ImageParams(
        rows=args.rows,
        columns=int(args.rows * 0.92),
        bits_stored=12,
        syntax=args.syntax,
        modality="CR",
        photometric="MONOCHROME1",
    )
    synth.write_image(path, params, positive=True, seed=42, study=1)
    src = SourceFile(uri=str(path), path=str(path))
    spec = untrained_checkpoint().preprocessing.to_dict()
    thumbs = str(work / "thumbs")

    def calls(thumbnails: str | None, tag: str) -> None:
        for i in range(args.calls):
            decoded = decode_item(src, f"1.2.3.{tag}.{i}", spec, True, thumbnails)
            if decoded.error is not None:
                raise SystemExit(f"decoding the profiled image failed: {decoded.error}")

    for label, thumbnails in (("without thumbnail", None), ("with thumbnail", thumbs)):
        calls(thumbnails, "warm")
        started = time.perf_counter()
        calls(thumbnails, "timed")
        ms = (time.perf_counter() - started) / args.calls * 1000
        print(f"decode_item {label}: {ms:.1f} ms per image")
    profile = cProfile.Profile()
    profile.enable()
    calls(thumbs, "profiled")
    profile.disable()
    print(f"\n{args.calls} calls with thumbnails, by own time:")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
