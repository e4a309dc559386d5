"""Retrieval from a PACS on loopback: instances/s and MB/s with 1, 4 and 8 connections, over
WADO-RS, C-MOVE and C-GET.

    .venv/bin/python benchmarks/bench_pacs.py                      # 100 x ~2000 px, explicit VR LE
    .venv/bin/python benchmarks/bench_pacs.py --n 200 --size 1024 --syntax j2k_lossless
    .venv/bin/python benchmarks/bench_pacs.py --methods wado --connections 1 4 8 16

Starts Debian's Orthanc (``tests/pacs/orthanc.py``: its own storage, loopback ports, the
DICOMweb plugin, basic auth) in a temporary folder, loads ``--n`` generated single-image CR
studies (``tasks.dicom.synth``) on one study date, then for each method and connection count
runs the real retrieval (``tasks.dicom.pacs.source.PacsRetrieval``: study query, series and
instance listing, retrieval, completeness) and consumes every instance in memory. Times include
the queries. Each configuration runs ``--repeat`` times; the best is printed (and the median).
Numbers depend on the machine and its load (printed first); compare lines from one run only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "pacs"))

from orthanc import Modality, Orthanc, free_port  # noqa: E402

from tasks.dicom import synth  # noqa: E402
from tasks.dicom.pacs.common import StudyWindow  # noqa: E402
from tasks.dicom.pacs.config import build_entry  # noqa: E402
from tasks.dicom.pacs.source import PacsRetrieval, make_client  # noqa: E402

DATE = "20261128"


def make_corpus(folder: Path, n: int, size: int, syntax: str) -> list[Path]:
    import pydicom

    paths = []
    for i in range(n):
        path = folder / f"{syntax}_{size}_{i:05d}.dcm"
        if not path.exists():
            params = synth.ImageParams(
                rows=size,
                columns=int(size * 0.92),
                bits_stored=8 if syntax in synth.EIGHT_BIT_ONLY else 12,
                photometric="MONOCHROME1",
                syntax=syntax,
                modality="CR",
            )
            synth.write_image(path, params, positive=bool(i % 2), seed=11, study=i)
            ds = pydicom.dcmread(path)
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = DATE
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def entry_for(method: str, pacs: Orthanc, move_port: int, connections: int):
    if method == "wado":
        values = {
            "url": pacs.dicomweb_url,
            "username": pacs.username,
            "password": pacs.password,
        }
    else:
        values = {
            "url": f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
            "retrieve": "move" if method == "cmove" else "get",
            "move_port": move_port,
            "move_bind": "127.0.0.1",
        }
    values["connections"] = connections
    return build_entry(f"bench-{method}", values, "CXRSCREEN", "benchmark")


def one_run(entry, expected: int) -> tuple[float, int, int]:
    started = time.perf_counter()
    count = size = 0
    with PacsRetrieval(make_client(entry), window=StudyWindow.parse(DATE)) as run:
        run.prepare()
        for src in run.files():
            if src.error is not None:
                raise RuntimeError(src.error)
            count += 1
            size += len(src.read_bytes())
        if run.partial_studies():
            raise RuntimeError(f"{len(run.partial_studies())} partial studies")
    seconds = time.perf_counter() - started
    if count != expected:
        raise RuntimeError(f"retrieved {count} instances, expected {expected}")
    return seconds, count, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="studies (one instance each)")
    parser.add_argument("--size", type=int, default=2000, help="image rows (columns 0.92x)")
    parser.add_argument("--syntax", default="explicit_le", choices=sorted(synth.SYNTAXES))
    parser.add_argument("--methods", nargs="+", default=["wado", "cmove", "cget"])
    parser.add_argument("--connections", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="keep the corpus here (reused)")
    args = parser.parse_args()

    print(
        f"# {platform.machine()} cores={os.cpu_count()} python {platform.python_version()} "
        f"load {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        corpus_dir = args.dir or Path(tmp) / "corpus"
        corpus_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = make_corpus(corpus_dir, args.n, args.size, args.syntax)
        total_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(
            f"corpus: {len(paths)} x {args.size}px {args.syntax}, {total_mb:.0f} MB "
            f"({time.perf_counter() - started:.0f}s)"
        )
        move_port = free_port()
        with Orthanc(
            Path(tmp) / "orthanc",
            modalities={"cxrscreen": Modality("CXRSCREEN", "127.0.0.1", move_port)},
        ) as pacs:
            started = time.perf_counter()
            pacs.upload_files(paths)
            print(f"orthanc: loaded in {time.perf_counter() - started:.1f}s (POST /instances)")
            results = {}
            for method in args.methods:
                for connections in args.connections:
                    entry = entry_for(method, pacs, move_port, connections)
                    times = []
                    for _ in range(args.repeat):
                        seconds, count, size = one_run(entry, len(paths))
                        times.append(seconds)
                    best = min(times)
                    results[(method, connections)] = count / best
                    print(
                        f"{method:6s} {connections:2d} conn  {count / best:7.1f} instances/s  "
                        f"{size / 1e6 / best:7.1f} MB/s  (best of {len(times)}: {best:.2f}s, "
                        f"median {statistics.median(times):.2f}s; load "
                        f"{os.getloadavg()[0]:.1f})"
                    )
    line = " ".join(f"{m}_{c}={v:.1f}" for (m, c), v in results.items())
    print(f"RESULT instances_per_s {line}")


if __name__ == "__main__":
    main()
