"""End-to-end ``cxr-screen screen`` on a GPU: today's CPU pixel path against the device path.

On the GPU machine (one H200, 16 cores, 64 GiB disk; under 5 minutes), from the repository root,
after the dependencies are installed (``benchmarks/gpu_wheels.sh`` says how):

    python benchmarks/bench_gpu_e2e.py --out $OUT

Dry run on a CPU machine (tiny corpus, same code; the device path's code is forced on the CPU
with ``CXR_SCREEN_PIXEL_PATH=device``):

    python benchmarks/bench_gpu_e2e.py --dry-run

What it does, in order (every step reports what it measured; a step that fails says why and
the others still run):

1. machine: GPU, driver, torch, CUDA, cores, memory, /dev/shm, nvImageCodec (or why not);
2. one Prefect server for all runs (booting while the corpus is written);
3. corpus, generated here in parallel: ``--n`` single-frame CR radiographs, ``--rows`` x 0.92
   ``--rows`` px, 12-bit, MONOCHROME1 and 2, explicit VR LE, and ``--n-j2k`` of the same
   images as JPEG 2000 lossless (12 distinct images, each written again under new UIDs);
4. limits: reading the corpus from the page cache with 16 threads, and host-to-device copies
   from pinned memory (what the uncompressed path moves per image);
5. end to end: ``cxr-screen screen CORPUS --force --json --shard-size S`` as a user runs it,
   ``--repeat`` times per corpus and pixel path (``CXR_SCREEN_PIXEL_PATH=cpu`` is today's path,
   ``device`` the new one), SQLite results database; per run: images/s end to end (process
   wall, start-up included) and steady (images / the run's own processing seconds), GPU
   utilisation sampled every 0.2 s during processing, and which path and decoder the stored
   facts say ran;
6. equality on this machine: a sample of files through the CPU path (``decode_item``) and the
   device path (``DevicePool``, nvImageCodec for JPEG 2000 when available): max |difference|
   of the model inputs and thumbnails, against the full-resolution CPU decode (the device
   decodes JPEG 2000 at full resolution) and the reduced one (today's default), and the
   largest |difference| of the model's probabilities;
7. time split, in this process, with the device waiting after each step (``profile``):
   header scan, decode workers' CPU, copy, counting, tables, pixel work, inference, database;
8. a RESULT line; everything printed is also written to ``--out`` (default
   ``benchmarks/results/``) as ``gpu-e2e-<gpu>-<date>.txt``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DISTINCT = 12
CLI = "from cli.app import app; app()"


class Report:
    """print() that also keeps every line for the results file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def step(self, title: str):
        self(f"\n## {title}")
        return _Step(self)


class _Step(contextlib.AbstractContextManager):
    def __init__(self, report: Report) -> None:
        self.report = report
        self.started = time.perf_counter()

    def __exit__(self, kind, exc, tb):
        took = time.perf_counter() - self.started
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.report(f"STEP FAILED after {took:.1f}s: {type(exc).__name__}: {exc}")
            self.report("".join(traceback.format_exception(exc)).rstrip()[-2000:])
            return True  # the next steps still run
        self.report(f"(step took {took:.1f}s)")
        return False


# --- machine ----------------------------------------------------------------------------------


def machine(say: Report) -> str:
    import torch

    gpu = "cpu"
    say(f"date {dt.datetime.now().isoformat(timespec='seconds')}")
    say(f"host {platform.node()} {platform.machine()} python {platform.python_version()}")
    say(f"cores {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})")
    with contextlib.suppress(Exception):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        say(f"memory {pages / 2**30:.0f} GiB")
    with contextlib.suppress(Exception):
        shm = shutil.disk_usage("/dev/shm")
        say(f"/dev/shm {shm.total / 2**30:.1f} GiB, free {shm.free / 2**30:.1f} GiB")
    say(
        f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}"
    )
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        say(f"gpu {gpu}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,pcie.link.gen.max,pcie.link.width.max",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            say(f"nvidia-smi: driver, PCIe gen, width: {out.stdout.strip()}")
    from tasks.dicom.decoders import nvimgcodec

    why = nvimgcodec.unavailable_reason()
    if why is None:
        from nvidia import nvimgcodec as nv  # type: ignore[import-not-found]

        say(f"nvImageCodec {getattr(nv, '__version__', '?')}: available")
    else:
        say(f"nvImageCodec: unavailable: {why}")
    return gpu


# --- Prefect server -------------------------------------------------------------------------------


def start_prefect(home: Path, say: Report):
    """One local Prefect server for every run (None: each run starts its own)."""
    try:
        from cli.server import LocalPrefectServer

        server = LocalPrefectServer(temporary=True, home=home, startup_timeout=180).start()
        return server
    except Exception as exc:
        say(f"no shared Prefect server ({type(exc).__name__}: {exc}); each run starts its own")
        return None


# --- corpus ---------------------------------------------------------------------------------------


def _base(args: tuple) -> str:
    """Write distinct image ``i`` (in a worker process)."""
    i, rows, syntax, path = args
    from tasks.dicom import synth

    params = synth.ImageParams(
        rows=rows,
        columns=int(rows * 0.92),
        bits_stored=12,
        syntax=syntax,
        modality="CR",
        photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
        window_scale=0.8 if i % 3 == 2 else 1.1,  # one in three clips (no straight-line path)
    )
    synth.write_image(Path(path), params, positive=bool(i % 2), seed=42, study=i)
    return path


def _copies(args: tuple) -> int:
    """Write files ``first .. first + n - 1`` as copies of the bases under new UIDs."""
    bases, out, first, n, tag = args
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    datasets = [dcmread(b) for b in bases]
    for j in range(first, first + n):
        ds = datasets[j % len(datasets)]
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"{tag}-study-{j // 2}"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"{tag}-series-{j // 2}"])
        uid = generate_uid(entropy_srcs=[f"{tag}-sop-{j}"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        folder = Path(out) / f"{j // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{j:06d}.dcm", enforce_file_format=True)
    return n


def make_corpus(root: Path, n: int, rows: int, syntax: str, pool, say: Report) -> Path:
    out = root / f"{syntax}-{rows}-{n}"
    marker = out / ".complete"
    if marker.exists():
        say(f"corpus {out} (exists)")
        return out
    shutil.rmtree(out, ignore_errors=True)
    base_dir = root / f"base-{syntax}-{rows}"
    base_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, rows, syntax, str(base_dir / f"{i}.dcm")) for i in range(min(DISTINCT, n))]
    bases = [p if Path(p).exists() else None for _, _, _, p in jobs]
    todo = [j for j, b in zip(jobs, bases, strict=True) if b is None]
    bases = [b for b in bases if b] + list(pool.map(_base, todo))
    per = max(1, -(-n // (4 * (os.cpu_count() or 1))))
    chunks = [(sorted(bases), str(out), f, min(per, n - f), syntax) for f in range(0, n, per)]
    written = sum(pool.map(_copies, chunks))
    marker.write_text("ok")
    size = sum(f.stat().st_size for f in out.rglob("*.dcm"))
    say(
        f"corpus {out}: {written} files, {size / 2**30:.2f} GiB ({size / written / 2**20:.2f} MiB each)"
    )
    return out


# --- limits ---------------------------------------------------------------------------------------


def read_limit(corpus: Path, threads: int, say: Report) -> float:
    files = sorted(corpus.rglob("*.dcm"))

    def read(path: Path) -> int:
        with open(path, "rb") as f:
            return len(f.read())

    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(read, files[: min(len(files), 64)]))  # warm
        started = time.perf_counter()
        total = sum(ex.map(read, files))
    seconds = time.perf_counter() - started
    rate = len(files) / seconds
    say(
        f"read {corpus.name}: {len(files)} files, {total / seconds / 2**30:.1f} GiB/s with "
        f"{threads} threads = {rate:.0f} files/s (page cache; one read per file)"
    )
    return rate


def copy_limit(image_bytes: int, say: Report) -> float | None:
    import torch

    if not torch.cuda.is_available():
        say("host-to-device copy: no CUDA device")
        return None
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    rate = reps * n / (time.perf_counter() - started)
    say(
        f"host-to-device copy from pinned memory: {rate / 2**30:.1f} GiB/s = "
        f"{rate / image_bytes:.0f} images/s of {image_bytes / 2**20:.1f} MiB"
    )
    return rate / image_bytes


# --- end to end -----------------------------------------------------------------------------------


class GpuSampler:
    """GPU utilisation every ``period`` seconds in a thread (NVML, else nvidia-smi)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self.samples: list[tuple[float, float]] = []  # (time, utilisation %)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    def _reader(self):
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        if shutil.which("nvidia-smi"):

            def smi() -> float:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                return float(out.stdout.split()[0])

            return smi
        return None

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.perf_counter(), self._read()))
            self._stop.wait(self.period)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def during(self, start: float, end: float) -> tuple[float, float] | None:
        """(mean, max) utilisation between ``start`` and ``end`` (perf_counter times)."""
        values = [u for t, u in self.samples if start <= t <= end]
        return (statistics.mean(values), max(values)) if values else None


def run_cli(corpus: Path, model: Path, db: Path, path: str, shard: int, env: dict) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CLI,
        "screen",
        str(corpus),
        "--model",
        str(model),
        "--db",
        f"sqlite:///{db}",
        "--shard-size",
        str(shard),
        "--force",
        "--json",
    ]
    env = {**os.environ, **env, "CXR_SCREEN_PIXEL_PATH": path}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with GpuSampler() as sampler:
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        ended = time.perf_counter()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"cxr-screen exited {proc.returncode}: {proc.stderr[-2500:]}")
    summary = json.loads(lines[-1])
    summary["wall"] = ended - started
    summary["gpu"] = sampler.during(ended - float(summary.get("seconds", 0)), ended)
    summary["ran"] = ran(db, summary["run_id"])
    return summary


def ran(db: Path, run_id: int) -> str:
    """Which pixel path and decoders the stored facts of a run say ran."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT json_extract(facts, '$.pixel_path'), json_extract(facts, '$.decoder'), "
            "count(*) FROM file_outcomes WHERE run_id = ? AND outcome = 'predicted' "
            "GROUP BY 1, 2",
            (run_id,),
        ).fetchall()
    except sqlite3.Error as exc:
        return f"(facts unreadable: {exc})"
    finally:
        con.close()
    return ", ".join(f"{p or 'cpu'}/{d}: {n}" for p, d, n in rows) or "(no predicted files)"


def end_to_end(corpus: Path, model: Path, work: Path, args, env: dict, say: Report) -> dict:
    results: dict[str, list[dict]] = {}
    for path in ("cpu", "device"):
        db = work / f"results-{corpus.name}-{path}.db"
        results[path] = []
        for r in range(args.repeat):
            s = run_cli(corpus, model, db, path, args.shard_size, env)
            steady = s["predicted"] / max(s["seconds"], 1e-9)
            gpu = s["gpu"]
            util = f"GPU {gpu[0]:.0f}% mean, {gpu[1]:.0f}% max" if gpu else "GPU n/a"
            say(
                f"{corpus.name:28s} {path:6s} run {r + 1}: {s['predicted']} predicted, "
                f"{s['failed']} failed; end to end {s['predicted'] / s['wall']:7.1f} images/s "
                f"(wall {s['wall']:.1f}s), steady {steady:7.1f} images/s "
                f"({s['seconds']:.1f}s processing); {util}; ran {s['ran']}"
            )
            s["steady"] = steady
            results[path].append(s)
    return results


def best(runs: list[dict], key: str = "steady") -> float:
    return max(r[key] for r in runs) if runs else float("nan")


# --- equality ---------------------------------------------------------------------------------


def equality(corpora: list[Path], model: Path, ks: list[int], say: Report) -> dict:
    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint
    from model.predictor import Predictor
    from tasks.device.pipeline import DevicePixels
    from tasks.device.pool import DevicePool
    from tasks.device.prepare import Options
    from tasks.device.processor import _frame_decoder
    from tasks.dicom.discovery import SourceFile
    from tasks.ingest import decode_item

    checkpoint = load_checkpoint(model)
    spec = checkpoint.preprocessing
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoder, why = _frame_decoder("auto", device)
    say(f"device {device}; frame decoder: {decoder.name if decoder else f'none ({why})'}")
    predictor = Predictor(checkpoint, device=str(device))
    worst: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="equality-"))
    for corpus, k in zip(corpora, ks, strict=True):
        files = sorted(corpus.rglob("*.dcm"))[:k]

        def call(path: Path, reduced: bool, where: str) -> tuple:
            src = SourceFile(uri=str(path), path=str(path))
            return (
                inspect.signature(decode_item)
                .bind(
                    src,
                    f"1.2.3.{abs(hash(path.name)) % 10**8}",
                    spec.to_dict(),
                    reduced=reduced,
                    thumbnails_dir=str(tmp / where),
                )
                .args
            )

        full = [decode_item(*call(p, False, "full")) for p in files]
        reduced = [decode_item(*call(p, True, "reduced")) for p in files]
        pixels = DevicePixels(spec, device, batch_size=predictor.batch_size, frame_decoder=decoder)
        syntaxes = frozenset(decoder.syntaxes) if decoder is not None else frozenset()
        with DevicePool(0, pixels, Options(syntaxes)) as pool:
            dev = pool.decode_all([call(p, True, "device") for p in files])
        errors = [d.error for d in dev if d.error] + [c.error for c in full if c.error]
        if errors:
            say(f"{corpus.name}: errors {errors[:3]}")
            continue
        d_full = max(float(np.abs(d.image - c.image).max()) for d, c in zip(dev, full, strict=True))
        d_red = max(
            float(np.abs(d.image - c.image).max()) for d, c in zip(dev, reduced, strict=True)
        )
        same_thumbs = sum(
            Path(d.thumbnail_path).read_bytes() == Path(c.thumbnail_path).read_bytes()
            for d, c in zip(dev, full, strict=True)
            if d.thumbnail_path and c.thumbnail_path
        )
        p_dev = predictor.predict(np.stack([d.image for d in dev]))
        p_full = predictor.predict(np.stack([c.image for c in full]))
        p_red = predictor.predict(np.stack([c.image for c in reduced]))
        decoders = sorted({str(d.facts.get("decoder")) for d in dev})
        say(
            f"{corpus.name}: {len(files)} files, device decoders {decoders}: max |model input "
            f"difference| vs full CPU decode {d_full:.2e}, vs today's CPU path {d_red:.2e}; "
            f"thumbnails identical {same_thumbs}/{len(files)}; max |dp| vs full "
            f"{float(np.abs(p_dev - p_full).max()):.2e}, vs today's "
            f"{float(np.abs(p_dev - p_red).max()):.2e}"
        )
        worst[corpus.name] = d_full
    shutil.rmtree(tmp, ignore_errors=True)
    return worst


# --- time split ---------------------------------------------------------------------------------


def time_split(corpus: Path, model: Path, work: Path, args, say: Report) -> None:
    """Both paths in this process on ``--split-n`` files, each step timed (device steps with
    the device waiting after each: no overlap)."""
    import torch

    from model.checkpoint import load_checkpoint
    from sql.db import connect
    from tasks.device.processor import DeviceShardProcessor
    from tasks.ingest import scan, shards
    from tasks.screening import ShardProcessor, open_run
    from tasks.shard_loop import ShardLoop, ShardSteps

    checkpoint = load_checkpoint(model)
    files = sorted(corpus.rglob("*.dcm"))[: args.split_n]
    subset = work / f"split-{corpus.name}"
    if not subset.exists():
        subset.mkdir(parents=True)
        for f in files:
            (subset / f.name).symlink_to(f)

    class Timed(ShardSteps):
        def plan(self, items):
            with self._t("plan (database read)"):
                return super().plan(items)

        def start(self, items, skip):
            with self._t("submit"):
                return super().start(items, skip)

        def score(self, pending):
            with self._t("collect (wait, pixel work, inference)"):
                rows = super().score(pending)
            self.times["inference"] += rows.infer_seconds
            return rows

        def write(self, rows):
            with self._t("database write (writer thread)"):
                return super().write(rows)

        @contextlib.contextmanager
        def _t(self, name):
            started = time.perf_counter()
            try:
                yield
            finally:
                self.times[name] += time.perf_counter() - started

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for path in ("cpu", "device"):
        engine = connect(f"sqlite:///{work / f'split-{path}.db'}")
        run = open_run(
            engine,
            checkpoint,
            kind="reprocess",
            source=str(subset),
            parameters={},
            selection_policy={},
        )
        kwargs = {"device": device, "workers": args.workers}
        if path == "device":
            proc = DeviceShardProcessor(checkpoint, profile=True, **kwargs)
        else:
            proc = ShardProcessor(checkpoint, **kwargs)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        from collections import Counter

        times: Counter = Counter()
        started = time.perf_counter()
        scan_seconds = 0.0
        with proc:
            steps = Timed(run, proc, force=True)
            steps.times = times  # type: ignore[attr-defined]

            def timed_scan():
                nonlocal scan_seconds
                it = iter(scan([subset], b"bench-key", in_workers=True))  # as the flow
                while True:
                    t0 = time.perf_counter()
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    finally:
                        scan_seconds += time.perf_counter() - t0
                    yield item

            tally = ShardLoop(steps).run(shards(timed_scan(), args.shard_size))
            device_steps = dict(getattr(proc, "timings", {}))
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        workers_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        n = max(tally.counts.get("predicted", 0), 1)
        say(
            f"{path:6s}: {n} images in {wall:.1f}s ({n / wall:.0f} images/s in-process); "
            f"ms per image:"
        )
        say(f"   listing files (main process)        {1000 * scan_seconds / n:8.2f}")
        say(
            f"   decode workers' CPU (read, parse, header scan, hash, decode{', window, resize' if path == 'cpu' else ''})"
            f" {1000 * workers_cpu / n:8.2f} (CPU time, all workers)"
        )
        for name, seconds in sorted(times.items()):
            say(f"   {name:36s} {1000 * seconds / n:8.2f}")
        for name, seconds in sorted(device_steps.items()):
            say(f"   device path: {name:23s} {1000 * seconds / n:8.2f}")
        engine.dispose()


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny corpus, for a CPU machine")
    ap.add_argument("--n", type=int, default=None, help="uncompressed images (default 3000)")
    ap.add_argument("--n-j2k", type=int, default=None, help="JPEG 2000 images (default 1500)")
    ap.add_argument("--rows", type=int, default=None, help="image rows (default 2000)")
    ap.add_argument("--shard-size", type=int, default=None, help="default 1024")
    ap.add_argument("--repeat", type=int, default=None, help="runs per corpus and path (3)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: cores)")
    ap.add_argument("--split-n", type=int, default=None, help="files in the time split (1024)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: untrained)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxr-gpu-e2e")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the corpus afterwards")
    args = ap.parse_args()
    dry = args.dry_run
    args.n = args.n or (24 if dry else 3000)
    args.n_j2k = args.n_j2k or (12 if dry else 1500)
    args.rows = args.rows or (640 if dry else 2000)
    args.shard_size = args.shard_size or (8 if dry else 1024)
    args.repeat = args.repeat or (1 if dry else 3)
    args.split_n = args.split_n or (16 if dry else 1024)
    if dry and args.workers is None:
        args.workers = 2

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    say = Report()
    say(f"# bench_gpu_e2e {'(dry run) ' if dry else ''}{' '.join(sys.argv[1:])}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {"CXR_SCREEN_HOME": str(work / "home"), "PREFECT_HOME": str(work / "prefect")}
    if args.workers is not None:
        env["CXR_SCREEN_WORKERS"] = str(args.workers)
    gpu = "cpu"
    with say.step("machine"):
        gpu = machine(say)

    server = start_prefect(work / "prefect", say)
    corpora: list[Path] = []
    with say.step("corpus"), cf.ProcessPoolExecutor(os.cpu_count()) as pool:
        corpora.append(make_corpus(work, args.n, args.rows, "explicit_le", pool, say))
        corpora.append(make_corpus(work, args.n_j2k, args.rows, "j2k_lossless", pool, say))
    if server is not None:
        try:
            server.wait_ready()
            env["PREFECT_API_URL"] = server.api_url
            say(f"Prefect server {server.api_url}")
        except Exception as exc:
            say(f"shared Prefect server did not start ({exc}); each run starts its own")

    model = args.model or work / "model.pt"
    if not model.exists():
        from model.checkpoint import untrained_checkpoint

        untrained_checkpoint(version="bench", name="bench", head_std=0.2, calibrate=True).save(
            model
        )

    limits: dict[str, float | None] = {}
    with say.step("limits"):
        image_bytes = int(args.rows * int(args.rows * 0.92) * 2)
        limits["read"] = read_limit(corpora[0], min(16, os.cpu_count() or 1), say)
        limits["j2k read"] = read_limit(corpora[1], min(16, os.cpu_count() or 1), say)
        limits["copy"] = copy_limit(image_bytes, say)

    e2e: dict[str, dict] = {}
    for corpus in corpora:
        with say.step(f"end to end: {corpus.name}"):
            e2e[corpus.name] = end_to_end(corpus, model, work, args, env, say)

    worst: dict = {}
    with say.step("equality of the two paths on this machine"):
        # a full JPEG 2000 decode on the CPU takes ~1 s at 2000 px: fewer of those
        worst = equality(corpora, model, [8, 8] if dry else [32, 12], say)

    with say.step("time split (in process, profiled)"):
        time_split(corpora[0], model, work, args, say)

    if server is not None:
        server.stop()
    names = [c.name for c in corpora]
    rates = {
        f"{kind}_{path}": best(e2e.get(name, {}).get(path, []))
        for kind, name in zip(("uncompressed", "j2k"), names, strict=True)
        for path in ("cpu", "device")
    }
    gpu_util = {}
    for kind, name in zip(("uncompressed", "j2k"), names, strict=True):
        runs = e2e.get(name, {}).get("device", [])
        means = [r["gpu"][0] for r in runs if r.get("gpu")]
        gpu_util[kind] = max(means) if means else float("nan")
    result = (
        "RESULT "
        + " ".join(f"{k}={v:.1f}" for k, v in rates.items())
        + f" device_vs_cpu_uncompressed={rates['uncompressed_device'] / rates['uncompressed_cpu']:.2f}"
        + f" device_vs_cpu_j2k={rates['j2k_device'] / rates['j2k_cpu']:.2f}"
        + f" gpu_util_device_uncompressed={gpu_util['uncompressed']:.0f}"
        + f" gpu_util_device_j2k={gpu_util['j2k']:.0f}"
        + f" read_limit={limits.get('read') or float('nan'):.0f}"
        + f" copy_limit={limits.get('copy') or float('nan'):.0f}"
        + f" max_input_diff={max(worst.values()) if worst else float('nan'):.1e}"
    )
    say("")
    say("(images/s: best steady rate of the runs; end-to-end rates are in the lines above)")
    say(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    name = "cpu-dry-run" if dry else gpu.lower().replace("nvidia ", "").replace(" ", "-")
    target = args.out / f"gpu-e2e-{name}-{stamp}.txt"
    target.write_text("\n".join(say.lines) + "\n")
    print(f"written: {target}")
    if not args.keep and not dry:
        for corpus in corpora:
            shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
