"""Screening throughput: naive loop vs bare ceiling vs the real flow, on one generated corpus.

    python benchmarks/bench_pipeline.py                       # defaults of issue #6 (long)
    python benchmarks/bench_pipeline.py --n 300 --rss-n 500   # a quicker look
    python benchmarks/bench_pipeline.py --ceiling-only --n 240 # the decode pool + inference only

Measured in the same run, on the same corpus (single-frame CR, ~2000x2000, 12-bit):

* naive    — per file: dcmread, pixel_array, apply_modality_lut + apply_voi_lut at full
             resolution, MONOCHROME1 inversion, a float resize, the model at batch size 1, one
             INSERT and commit per image (SQLite). What a typical script does.
* ceiling  — the same decode + preprocess + batched inference in a bare spawn process pool
             (tasks.screening.ShardProcessor, double-buffered), no Prefect, no database; run
             twice: bare, and writing the review thumbnail of each image as the flow does. The
             flow is judged against the second (same per-image work: what is left is Prefect
             and the database) and the ratio to the bare one is printed too.
* flow     — `cxr-screen screen --json` end to end, each run a fresh process as a user runs it
             (Prefect's temporary local server, SQLite, then PostgreSQL). Its fixed start-up
             (server, imports, model load, run bookkeeping) is the wall time of the command on
             an empty folder (median of 3, after a warm-up), shown also with a Prefect server
             that is already running; the steady-state rate is images / the flow's own
             processing seconds (from the decode pool's start to the last commit).
* j2k      — the flow on a JPEG 2000 copy of the corpus, reduced versus full decoding, with the
             largest probability difference between the two.
* rss      — peak RSS of the command's process for --rss-n and 10x --rss-n small images (memory
             must not grow with the archive).

Every mode runs in its own process. Ends with a RESULT line of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
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

    from tasks.dicom import synth

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


def mode_ceiling(
    corpus: Path, model: Path, shard_size: int, workers: int | None, thumbnails: str = ""
) -> dict:
    from model.checkpoint import load_checkpoint
    from tasks.ingest import scan, shards
    from tasks.screening import ShardProcessor

    ckpt = load_checkpoint(model)
    started = time.perf_counter()
    main_cpu = time.process_time()
    predicted = 0
    thumbs = thumbnails or None
    with ShardProcessor(ckpt, device="auto", workers=workers, thumbnails_dir=thumbs) as proc:
        pending = None
        # the workers scan the files they read, as the flow's do
        for shard in shards(scan([corpus], b"bench-key", in_workers=True), shard_size):
            nxt = proc.submit(shard)
            if pending is not None:
                predicted += proc.collect(pending).counts["predicted"]
            pending = nxt
        if pending is not None:
            predicted += proc.collect(pending).counts["predicted"]
    workers_usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool has been joined
    return {
        "images": predicted,
        "seconds": time.perf_counter() - started,
        "main_cpu": time.process_time() - main_cpu,
        "workers_cpu": workers_usage.ru_utime + workers_usage.ru_stime,
    }


def run_cli(
    sources: list[str],
    model: Path,
    db_url: str,
    shard_size: int,
    workers: int | None,
    reduced: bool = True,
    env: dict[str, str] | None = None,
) -> dict:
    """``cxr-screen screen --json`` end to end in a fresh process, as a user runs it.

    Returns the run summary plus ``wall`` (process start to exit, seconds) and the process's
    peak RSS as the command reports it.
    """
    cmd = [
        str(Path(sys.executable).with_name("cxr-screen")),
        "screen",
        *sources,
        "--model",
        str(model),
        "--db",
        db_url,
        "--shard-size",
        str(shard_size),
        "--force",
        "--json",
    ]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if not reduced:
        cmd.append("--full-decode")
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"cxr-screen failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(lines[-1])
    summary["wall"] = wall
    return summary


def scores(db_url: str, run_id: int) -> dict[str, float]:
    import sqlalchemy as sa

    eng = sa.create_engine(db_url)
    with eng.connect() as c:
        rows = c.execute(
            sa.text("SELECT sop_instance_uid, score FROM image_predictions WHERE run_id = :r"),
            {"r": run_id},
        ).all()
    eng.dispose()
    return dict(rows)


def child(argv: list[str]) -> None:
    mode = argv[0]
    args = json.loads(argv[1])
    result = globals()[f"mode_{mode}"](**args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("CHILD-RESULT " + json.dumps(result))


def run_child(mode: str, extra: list[str] | None = None, **kwargs) -> dict:
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    cmd = [sys.executable, __file__, "--child", mode, json.dumps(kwargs), *(extra or [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD-RESULT "):
            return {**json.loads(line.removeprefix("CHILD-RESULT ")), "wall": wall}
    raise RuntimeError(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def make_model(path: Path) -> Path:
    """An untrained LGMobileNetV2 whose scores depend on the pixels (batch-norm statistics
    calibrated, head std 0.2), so that the reduced-vs-full probability check means something."""
    from model.checkpoint import untrained_checkpoint

    if not path.exists():
        ckpt = untrained_checkpoint(version="bench", name="bench", head_std=0.2, calibrate=True)
        ckpt.save(path)
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


def median_wall(runs: list[dict]) -> float:
    return statistics.median(r["wall"] for r in runs)


def rate(result: dict) -> float:
    return result["images"] / result["seconds"]


def ceilings(d: Path, corpus: Path, model: Path, shard_size: int, workers: int | None):
    """The bare ceiling, then the same writing review thumbnails as the flow does."""
    bare = run_child("ceiling", corpus=corpus, model=model, shard_size=shard_size, workers=workers)
    print(
        f"ceiling      {rate(bare):8.1f} images/s  ({bare['images']} in "
        f"{bare['seconds']:.1f}s; process wall incl. imports {bare['wall']:.1f}s, "
        f"peak RSS {bare['peak_rss_mb']:.0f} MB)"
    )
    print(cpu_per_image(bare))
    thumbs_dir = Path(tempfile.mkdtemp(prefix="thumbs-", dir=d))
    with_thumbs = run_child(
        "ceiling",
        corpus=corpus,
        model=model,
        shard_size=shard_size,
        workers=workers,
        thumbnails=thumbs_dir,
    )
    shutil.rmtree(thumbs_dir, ignore_errors=True)
    print(
        f"ceiling+th   {rate(with_thumbs):8.1f} images/s  (writing a review thumbnail per image "
        f"as the flow does; {with_thumbs['images']} in {with_thumbs['seconds']:.1f}s)"
    )
    print(cpu_per_image(with_thumbs))
    return bare, with_thumbs


def cpu_per_image(result: dict) -> str:
    n = max(result["images"], 1)
    return (
        f"             CPU per image: decode workers {1000 * result['workers_cpu'] / n:.1f} ms, "
        f"main process {1000 * result['main_cpu'] / n:.1f} ms (scan, inference, rows)"
    )


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
    ap.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only the two ceiling runs (a quick look at the decode pool and inference)",
    )
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="checkpoint to screen with (default: an untrained LGMobileNetV2 with calibrated "
        "batch norm; a trained model, e.g. the demo's, judges reduced decoding more fairly)",
    )
    args = ap.parse_args()
    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    print(
        f"# {platform.node()} {platform.machine()} cores={os.cpu_count()} "
        f"python {platform.python_version()} load {os.getloadavg()[0]:.2f}"
    )
    model = args.model.resolve() if args.model else make_model(d / "model.pt")
    print(f"model: {model}")
    t0 = time.perf_counter()
    corpus = make_corpus(d / f"uncompressed-{args.n}-{args.size}", args.n, args.size, "explicit_le")
    print(f"corpus: {args.n} x {args.size}px explicit VR LE ({time.perf_counter() - t0:.0f}s)")
    w = args.workers
    flow_args = {"model": model, "shard_size": args.shard_size, "workers": w}
    sqlite_url = f"sqlite:///{d / 'flow.db'}"

    if args.ceiling_only:
        ceilings(d, corpus, model, args.shard_size, w)
        return
    naive_dir = corpus
    if args.naive_n and args.naive_n < args.n:
        naive_dir = make_corpus(
            d / f"uncompressed-{args.naive_n}-{args.size}", args.naive_n, args.size, "explicit_le"
        )
    naive = run_child("naive", corpus=naive_dir, model=model, db=d / "naive.db")
    (d / "naive.db").unlink(missing_ok=True)
    print(
        f"naive        {rate(naive):8.1f} images/s  ({naive['images']} in "
        f"{naive['seconds']:.1f}s, peak RSS {naive['peak_rss_mb']:.0f} MB)"
    )
    bare, ceiling = ceilings(d, corpus, model, args.shard_size, w)

    # Fixed start-up: the whole command on an empty folder (after one untimed warm-up that
    # creates Prefect's and the results database), median of three.
    empty = d / "empty"
    empty.mkdir(exist_ok=True)
    (d / "flow.db").unlink(missing_ok=True)
    run_cli([str(empty)], db_url=sqlite_url, **flow_args)
    startup_s = median_wall(
        [run_cli([str(empty)], db_url=sqlite_url, **flow_args) for _ in range(3)]
    )
    print(
        f"flow start-up {startup_s:5.2f}s  (empty folder; temporary Prefect server, imports, model)"
    )
    from cli.server import start_local_server

    server = start_local_server()  # a Prefect server that is already running, as in production
    server.wait_ready()
    env = {"PREFECT_API_URL": server.api_url}
    run_cli([str(empty)], db_url=sqlite_url, env=env, **flow_args)
    startup_srv = median_wall(
        [run_cli([str(empty)], db_url=sqlite_url, env=env, **flow_args) for _ in range(3)]
    )
    server.stop()
    print(f"flow start-up {startup_srv:5.2f}s  (empty folder; Prefect server already running)")

    flow = run_cli([str(corpus)], db_url=sqlite_url, **flow_args)
    steady = flow["predicted"] / flow["seconds"]
    print(
        f"flow/sqlite  {flow['predicted'] / flow['wall']:8.1f} images/s end to end, {steady:.1f} "
        f"steady ({flow['predicted']} in {flow['wall']:.1f}s wall, {flow['seconds']:.1f}s "
        f"processing; peak RSS {flow['peak_rss_mb']:.0f} MB)"
    )
    if not args.no_postgres:
        pg = run_cli([str(corpus)], db_url=pg_database("cxr_bench"), **flow_args)
        print(
            f"flow/pg      {pg['predicted'] / pg['wall']:8.1f} images/s end to end, "
            f"{pg['predicted'] / pg['seconds']:.1f} steady ({pg['predicted']} in "
            f"{pg['wall']:.1f}s wall, {pg['seconds']:.1f}s processing)"
        )
    print(
        f"flow/ceiling {steady / rate(ceiling):.2f} (same per-image work), "
        f"{steady / rate(bare):.2f} (bare ceiling, no thumbnails)"
    )
    steady_overhead = 1.0 - steady / rate(ceiling)
    run_overhead = (flow["wall"] - ceiling["wall"]) / flow["wall"]

    j2k = make_corpus(d / f"j2k-{args.j2k_n}-{args.size}", args.j2k_n, args.size, "j2k_lossless")
    red_url, full_url = f"sqlite:///{d / 'j2k-red.db'}", f"sqlite:///{d / 'j2k-full.db'}"
    red = run_cli([str(j2k)], db_url=red_url, reduced=True, **flow_args)
    full = run_cli([str(j2k)], db_url=full_url, reduced=False, **flow_args)
    red_scores, full_scores = scores(red_url, red["run_id"]), scores(full_url, full["run_id"])
    for f in ("j2k-red.db", "j2k-full.db"):
        (d / f).unlink(missing_ok=True)
    assert red_scores.keys() == full_scores.keys() and red_scores, "J2K runs scored other files"
    diff = max(abs(red_scores[k] - full_scores[k]) for k in red_scores)
    red_rate, full_rate = red["predicted"] / red["seconds"], full["predicted"] / full["seconds"]
    print(
        f"j2k flow     reduced {red_rate:.1f} images/s, full {full_rate:.1f} images/s "
        f"(steady); max |p_reduced - p_full| = {diff:.4f} over {len(red_scores)} images"
    )

    small = make_corpus(d / f"small-{args.rss_n}", args.rss_n, 256, "explicit_le")
    big = make_corpus(d / f"small-{args.rss_n * 10}", args.rss_n * 10, 256, "explicit_le")
    rss_a = run_cli([str(small)], db_url=f"sqlite:///{d / 'rss-a.db'}", **flow_args)
    rss_b = run_cli([str(big)], db_url=f"sqlite:///{d / 'rss-b.db'}", **flow_args)
    for f in ("rss-a.db", "rss-b.db"):
        (d / f).unlink(missing_ok=True)
    print(
        f"rss          {rss_a['predicted']} images: {rss_a['peak_rss_mb']:.0f} MB; "
        f"{rss_b['predicted']} images: {rss_b['peak_rss_mb']:.0f} MB (command's process)"
    )
    print(
        f"overhead     Prefect + database: {100 * steady_overhead:.1f}% of the steady-state "
        f"rate; {100 * run_overhead:.1f}% of the {flow['predicted']}-image run's wall time "
        "(start-up included)"
    )
    print(
        "RESULT "
        f"flow_vs_naive={(flow['predicted'] / flow['wall']) / rate(naive):.2f} "
        f"flow_vs_ceiling={steady / rate(ceiling):.2f} "
        f"j2k_reduced_vs_full={red_rate / full_rate:.2f} "
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
