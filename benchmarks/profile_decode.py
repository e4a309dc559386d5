"""Where a decode worker's time goes for one image: cProfile of ``tasks.ingest.decode_item``.

    python benchmarks/profile_decode.py                     # 2000 x 1840, 12-bit, explicit VR LE
    python benchmarks/profile_decode.py --window-scale 0.8  # a window that clips (no linear path)
    python benchmarks/profile_decode.py --no-window         # percentile window
    python benchmarks/profile_decode.py --syntax j2k_lossless --calls 12

Generates one synthetic CR image, sets the allocator up as the decode workers do
(``keep_freed_memory``), warms up, then, ``--rounds`` times: ms per call with and without the
review thumbnail (CPU time of this process and wall clock, no profiler), and a profiled round
split into steps (the cumulative wall time of the functions that do each step, ms per image;
a CPU-clock profiler would add a system call per function call and inflate steps made of many
small calls, such as parsing). Prints the median of every number over the rounds (the machine is shared: single
rounds are noisy, CPU time less so than wall time), then the functions that took the most time
in the last profiled round.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# step: (file suffix, function name) pairs whose cumulative time is the step's. Names from
# before and after the one-pass reduction (commit 71f93ea and later) are both listed; a step whose
# functions did not run shows "-". The steps do not nest within each other.
STEPS: list[tuple[str, tuple[tuple[str, str], ...]]] = [
    ("read file", (("tasks/dicom/discovery.py", "read_bytes"),)),
    # before: a SHA-256 of the whole file in decode_item; after: the content hash, whose pixels
    # enter as their px1 (fingerprint.content_sha256)
    (
        "file / content hash",
        (
            ("~", "<built-in method _hashlib.openssl_sha256>"),
            ("tasks/dicom/fingerprint.py", "content_sha256"),
        ),
    ),
    ("parse (dcmread)", (("pydicom/filereader.py", "dcmread"),)),
    ("decode (+ bits check)", (("tasks/dicom/decoders/registry.py", "decode"),)),
    ("px1 fingerprint", (("tasks/dicom/fingerprint.py", "of_pixels"),)),
    (
        "min/max, plan (__init__s)",
        (("tasks/dicom/pixels.py", "__init__"),),
    ),
    ("histogram (counts)", (("tasks/dicom/pixels.py", "counts"),)),
    ("window table", (("tasks/dicom/pixels.py", "display_table"),)),
    (
        "LUT take (full res)",
        (("tasks/dicom/pixels.py", "_resizer"), ("tasks/dicom/pixels.py", "windowed_levels")),
    ),
    (
        "reduce: 2 Pillow resizes",
        (("~", "<method 'resize' of 'ImagingCore' objects>"),),
    ),
    ("window + reduce, one pass", (("tasks/dicom/pixels.py", "box_means"),)),
    ("thumbnail JPEG write", (("tasks/dicom/thumbnails.py", "write_thumbnail"),)),
]


def step_times(stats: pstats.Stats, calls: int) -> dict[str, float | None]:
    """ms per image of every step in ``STEPS`` (None when none of its functions ran)."""
    table = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float | None] = {}
    for name, functions in STEPS:
        total, seen = 0.0, False
        for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in table.items():
            for suffix, wanted in functions:
                if func == wanted and filename.endswith(suffix):
                    total += ct
                    seen = True
        out[name] = total / calls * 1000 if seen else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--syntax", default="explicit_le")
    ap.add_argument("--calls", type=int, default=20, help="images per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window-scale", type=float, default=1.1, help="< 1 clips")
    ap.add_argument("--no-window", action="store_true", help="no Window Center/Width")
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
        window=not args.no_window,
        window_scale=args.window_scale,
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

    first = decode_item(src, "1.2.3.facts", spec, True, thumbs)
    window = first.facts.get("window", {})
    print(
        f"# {args.rows} x {int(args.rows * 0.92)} {args.syntax}, window {window.get('source')}"
        f" (scale {args.window_scale}), linear path: {first.facts.get('window_linear')}"
    )
    walls: dict[str, list[float]] = {}
    steps: list[dict[str, float | None]] = []
    profile_stats = None
    for r in range(args.rounds):
        for label, thumbnails in (("without thumbnail", None), ("with thumbnail", thumbs)):
            calls(thumbnails, f"warm{r}")
            started, cpu = time.perf_counter(), time.process_time()
            calls(thumbnails, f"timed{r}")
            cpu = (time.process_time() - cpu) / args.calls * 1000
            wall = (time.perf_counter() - started) / args.calls * 1000
            walls.setdefault(f"{label}, CPU", []).append(cpu)
            walls.setdefault(f"{label}, wall", []).append(wall)
        profile = cProfile.Profile()
        profile.enable()
        calls(thumbs, f"profiled{r}")
        profile.disable()
        profile_stats = pstats.Stats(profile, stream=sys.stdout)
        steps.append(step_times(profile_stats, args.calls))
    print(f"median of {args.rounds} rounds of {args.calls} images, ms per image:")
    for label, values in walls.items():
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"  decode_item {label:24s} {statistics.median(values):6.1f}   ({shown})")
    print("steps (profiled, with thumbnail; wall time):")
    for name, _ in STEPS:
        values = [s[name] for s in steps if s[name] is not None]
        if not values:
            print(f"  {name:24s}      -")
            continue
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"  {name:24s} {statistics.median(values):6.2f}   ({shown})")
    print(f"\nlast round's {args.calls} calls with thumbnails, by own time:")
    assert profile_stats is not None
    profile_stats.sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
