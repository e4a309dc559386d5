"""Screening throughput: naive loop vs bare ceiling vs the real flow, on one generated corpus.

    python benchmarks/bench_pipeline.py                       # defaults of issue #6 (long)
    python benchmarks/bench_pipeline.py --n 300 --rss-n 500   # a quicker look

Measured in the same run, on the same corpus (single-frame CR, ~2000x2000, 12-bit):

* naive    — per file: dcmread, pixel_array, apply_modality_lut + apply_voi_lut at full
             resolution, MONOCHROME1 inversion, a float resize, the model at batch size 1, one
             INSERT and commit per image (SQLite). What a typical script does.
* ceiling  — the same decode + preprocess + batched inference in a bare spawn process pool
             (tasks.screening.ShardProcessor, double-buffered), no Prefect, no database.
* flow     — `screen` end to end (Prefect's local server, SQLite, then PostgreSQL); its fixed
             start-up (server, imports, model load) is measured on an empty source and the
             steady-state rate excludes it.
* j2k      — the flow on a JPEG 2000 copy of the corpus, reduced versus full decoding, with the
             largest probability difference between the two.
* rss      — peak RSS of the flow process for --rss-n and 10x --rss-n small images (memory must
             not grow with the archive).

Every mode runs in its own subprocess; peak RSS is that process's (the flow's decode workers
are separate processes with flat memory). Ends with a RESULT line of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --- corpus -------------------------------------------------------------------------------------


def make_corpus(out: Path, n: int, size: int, syntax: str, distinct: int = 12) -> Path:
    """``n`` files: ``distinct`` generated images, each written again under fresh UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from tasks import synth

    marker = out / f".done-{n}-{size}-{syntax}"
    if marker.exists():
        return out
    base = out.parent / f"_base-{out.name}"
    bases = []
    for i in range(min(distinct, n)):
        params = synth.ImageParams(
            rows=size,
            columns=int(size * 0.92),
            bits_stored=12,
            syntax=syntax,
            modality="CR",
            photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
        )
        path = base / f"{i}.dcm"
        synth.write_image(path, params, positive=bool(i % 2), seed=42, study=i)
        bases.append(dcmread(path))
    for j in range(n):
        ds = bases[j % len(bases)]
        study = generate_uid(entropy_srcs=[f"bench-study-{j // 2}"])
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"bench-series-{j // 2}"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[f"bench-sop-{j}"]
        )
        d = out / f"{j // 500:03d}"
        d.mkdir(parents=True, exist_ok=True)
        ds.save_as(d / f"{j:06d}.dcm", enforce_file_format=True)
    marker.write_text("ok")
    return out


# --- the modes, each run in a subprocess --------------------------------------------------------


def mode_naive(corpus: Path, model: Path, db: Path) -> dict:
    import sqlite3

    import numpy as np
    import torch
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from model.checkpoint import load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = load_checkpoint(model)
    net = ckpt.build()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE IF NOT EXISTS predictions (sop TEXT PRIMARY KEY, score REAL)")
    files = sorted(Path(corpus).rglob("*.dcm"))
    started = time.perf_counter()
    for path in files:
        ds = dcmread(path)
        arr = apply_modality_lut(ds.pixel_array, ds)
        arr = apply_voi_lut(arr, ds).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = 1.0 - arr
        x = torch.from_numpy(arr).float()[None, None]
        x = torch.nn.functional.interpolate(x, size=(150, 150), mode="bilinear", antialias=True)
        x = ((x - 0.5) / 0.25).expand(1, 3, 150, 150)
        with torch.no_grad():
            p = torch.softmax(net(x), 1)[0, 1].item()
        con.execute("INSERT OR REPLACE INTO predictions VALUES (?, ?)", (ds.SOPInstanceUID, p))
        con.commit()
    seconds = time.perf_counter() - started
    return {"images": len(files), "seconds": seconds}


def mode_ceiling(corpus: Path, model: Path, shard_size: int, workers: int | None) -> dict:
    from model.checkpoint import load_checkpoint
    from tasks.ingest import scan, shards
    from tasks.screening import ShardProcessor

    ckpt = load_checkpoint(model)
    started = time.perf_counter()
    predicted = 0
    with ShardProcessor(ckpt, device="auto", workers=workers) as proc:
        pending = None
        for shard in shards(scan([corpus], b"bench-key"), shard_size):
            nxt = proc.submit(shard)
            if pending is not None:
                predicted += proc.collect(pending).counts["predicted"]
            pending = nxt
        if pending is not None:
            predicted += proc.collect(pending).counts["predicted"]
    return {"images": predicted, "seconds": time.perf_counter() - started}


def mode_flow(
    sources: list[str],
    model: Path,
    db_url: str,
    shard_size: int,
    workers: int | None,
    reduced: bool = True,
) -> dict:
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
    os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "CRITICAL"
    from flows.common import quiet_prefect_defaults

    quiet_prefect_defaults()
    started = time.perf_counter()
    from flows.screen import screen

    summary = screen(
        sources,
        model=str(model),
        database_url=db_url,
        shard_size=shard_size,
        workers=workers,
        reduced=reduced,
        force=True,
    )
    total = time.perf_counter() - started
    out = {"images": summary["predicted"], "seconds": total, "inner_seconds": summary["seconds"]}
    if "--scores" in sys.argv:
        import sqlalchemy as sa

        eng = sa.create_engine(db_url)
        with eng.connect() as c:
            out["scores"] = dict(
                c.execute(
                    sa.text(
                        "SELECT p.sop_instance_uid, p.score FROM image_predictions p "
                        "WHERE p.run_id = :r"
                    ),
                    {"r": summary["run_id"]},
                ).all()
            )
    return out


def child(argv: list[str]) -> None:
    mode = argv[0]
    args = json.loads(argv[1])
    result = globals()[f"mode_{mode}"](**args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("CHILD-RESULT " + json.dumps(result))


def run_child(mode: str, extra: list[str] | None = None, **kwargs) -> dict:
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    cmd = [sys.executable, __file__, "--child", mode, json.dumps(kwargs), *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            return json.loads(line.removeprefix("CHILD-RESULT "))
    raise RuntimeError(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def make_model(path: Path) -> Path:
    import torch

    from model.checkpoint import Checkpoint
    from model.network import LGMobileNetV2
    from model.spec import PreprocessSpec

    if not path.exists():
        torch.manual_seed(0)
        net = LGMobileNetV2()
        # An untrained head (std 0.01) scores every image ~0.5; a wider one makes the score
        # depend on the pixels, so the reduced-vs-full probability check means something.
        torch.nn.init.normal_(net.classifier.weight, 0.0, 2.0)
        Checkpoint(
            architecture="lg_mobilenet_v2",
            arch_kwargs={"num_classes": 2},
            class_names=["normal", "abnormal"],
            positive_class="abnormal",
            threshold=0.5,
            preprocessing=PreprocessSpec(),
            version="bench",
            state_dict=LGMobileNetV2().state_dict(),
            name="bench",
        ).save(path)
    return path


def pg_database(name: str) -> str:
    import sqlalchemy as sa

    admin = sa.create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images in the main corpus")
    ap.add_argument("--size", type=int, default=2000, help="rows of each image")
    ap.add_argument("--j2k-n", type=int, default=200, help="images in the JPEG 2000 corpus")
    ap.add_argument("--rss-n", type=int, default=2000, help="small images for the memory check")
    ap.add_argument("--naive-n", type=int, default=None, help="run naive on the first N only")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cxr-bench")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    print(
        f"# {platform.node()} {platform.machine()} cores={os.cpu_count()} python {platform.python_version()}"
    )
    model = make_model(d / "model.pt")
    t0 = time.perf_counter()
    corpus = make_corpus(d / f"uncompressed-{args.n}-{args.size}", args.n, args.size, "explicit_le")
    print(
        f"corpus: {args.n} x {args.size}px explicit VR LE ready ({time.perf_counter() - t0:.0f}s)"
    )
    w = args.workers

    naive_dir = corpus
    if args.naive_n and args.naive_n < args.n:
        naive_dir = make_corpus(
            d / f"uncompressed-{args.naive_n}-{args.size}", args.naive_n, args.size, "explicit_le"
        )
    naive = run_child("naive", corpus=naive_dir, model=model, db=d / "naive.db")
    (d / "naive.db").unlink(missing_ok=True)
    rate = lambda r: r["images"] / r["seconds"]  # noqa: E731
    print(
        f"naive     {rate(naive):8.1f} images/s  ({naive['images']} in {naive['seconds']:.1f}s, peak RSS {naive['peak_rss_mb']:.0f} MB)"
    )
    ceiling = run_child(
        "ceiling", corpus=corpus, model=model, shard_size=args.shard_size, workers=w
    )
    print(
        f"ceiling   {rate(ceiling):8.1f} images/s  ({ceiling['images']} in {ceiling['seconds']:.1f}s, peak RSS {ceiling['peak_rss_mb']:.0f} MB)"
    )

    empty = d / "empty"
    empty.mkdir(exist_ok=True)
    sqlite = d / "flow.db"
    sqlite.unlink(missing_ok=True)
    startup = run_child(
        "flow",
        sources=[str(empty)],
        model=model,
        db_url=f"sqlite:///{sqlite}",
        shard_size=args.shard_size,
        workers=w,
    )
    startup_s = startup["seconds"]
    print(f"flow start-up {startup_s:.2f}s (empty source: Prefect server, imports, model load)")
    flow = run_child(
        "flow",
        sources=[str(corpus)],
        model=model,
        db_url=f"sqlite:///{sqlite}",
        shard_size=args.shard_size,
        workers=w,
    )
    steady = flow["images"] / max(1e-9, flow["seconds"] - startup_s)
    print(
        f"flow/sqlite {rate(flow):8.1f} images/s end to end, {steady:.1f} steady ({flow['images']} in {flow['seconds']:.1f}s, peak RSS {flow['peak_rss_mb']:.0f} MB)"
    )
    if not args.no_postgres:
        pg = run_child(
            "flow",
            sources=[str(corpus)],
            model=model,
            db_url=pg_database("cxr_bench"),
            shard_size=args.shard_size,
            workers=w,
        )
        print(
            f"flow/pg   {rate(pg):8.1f} images/s end to end, {pg['images'] / max(1e-9, pg['seconds'] - startup_s):.1f} steady ({pg['images']} in {pg['seconds']:.1f}s)"
        )
    overhead = (flow["seconds"] - startup_s) / ceiling["seconds"] - 1.0

    j2k = make_corpus(d / f"j2k-{args.j2k_n}-{args.size}", args.j2k_n, args.size, "j2k_lossless")
    red = run_child(
        "flow",
        ["--scores"],
        sources=[str(j2k)],
        model=model,
        db_url=f"sqlite:///{d / 'j2k-red.db'}",
        shard_size=args.shard_size,
        workers=w,
        reduced=True,
    )
    full = run_child(
        "flow",
        ["--scores"],
        sources=[str(j2k)],
        model=model,
        db_url=f"sqlite:///{d / 'j2k-full.db'}",
        shard_size=args.shard_size,
        workers=w,
        reduced=False,
    )
    for f in ("j2k-red.db", "j2k-full.db"):
        (d / f).unlink(missing_ok=True)
    diff = max(abs(red["scores"][k] - full["scores"][k]) for k in red["scores"])
    j2k_ratio = (red["images"] / (red["seconds"] - startup_s)) / (
        full["images"] / (full["seconds"] - startup_s)
    )
    print(
        f"j2k flow  reduced {red['images'] / (red['seconds'] - startup_s):.1f} images/s, full {full['images'] / (full['seconds'] - startup_s):.1f} images/s; max |p_reduced - p_full| = {diff:.4f}"
    )

    small = make_corpus(d / f"small-{args.rss_n}", args.rss_n, 256, "explicit_le")
    big = make_corpus(d / f"small-{args.rss_n * 10}", args.rss_n * 10, 256, "explicit_le")
    rss_a = run_child(
        "flow",
        sources=[str(small)],
        model=model,
        db_url=f"sqlite:///{d / 'rss-a.db'}",
        shard_size=args.shard_size,
        workers=w,
    )
    rss_b = run_child(
        "flow",
        sources=[str(big)],
        model=model,
        db_url=f"sqlite:///{d / 'rss-b.db'}",
        shard_size=args.shard_size,
        workers=w,
    )
    for f in ("rss-a.db", "rss-b.db"):
        (d / f).unlink(missing_ok=True)
    print(
        f"rss       {args.rss_n} images: {rss_a['peak_rss_mb']:.0f} MB; {args.rss_n * 10} images: {rss_b['peak_rss_mb']:.0f} MB"
    )
    print(f"prefect+db overhead vs ceiling: {100 * overhead:.1f}% of the steady-state wall time")
    print(
        "RESULT "
        f"flow_vs_naive={rate(flow) / rate(naive):.2f} "
        f"flow_vs_ceiling={steady / rate(ceiling):.2f} "
        f"j2k_reduced_vs_full={j2k_ratio:.2f} "
        f"rss_20k_vs_2k={rss_b['peak_rss_mb'] / rss_a['peak_rss_mb']:.2f} "
        f"startup_s={startup_s:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2:])
    else:
        sys.path.insert(0, str(ROOT))
        main()
