"""The screening flow over DICOMweb against the same corpus read from a local folder: the
steady-state images/s of each and their ratio (issue #14's target: DICOMweb >= 0.75x folder).

    .venv/bin/python benchmarks/bench_pacs_flow.py                   # 192 x 1024 px, 24/shard
    .venv/bin/python benchmarks/bench_pacs_flow.py --n 512 --size 2000 --shard-size 64

Starts Debian's Orthanc (``tests/pacs/orthanc.py``, loopback, DICOMweb plugin, basic auth) and
a temporary Prefect server (``prefect_test_harness``), writes ``--n`` generated single-image CR
studies (``tasks.dicom.synth``), loads them into Orthanc, then runs the real ``screen`` flow
(``flows.screen.screen``: header scan, selection, decode pool, model, shard writes; an
untrained checkpoint) on the folder and on ``pacs://bench`` alternately, ``--repeat`` times
each, every run into a fresh SQLite database. *Steady state*: the files stored between the
first and the last shard commit over the time between them (the progress events of
``flows.progress``), which leaves out the start-up (model, pool, the PACS's study query) and
the last shard's drain; the whole run's rate is printed too, and the CPU time Orthanc spent
serving the run (on a small machine it competes with the decode workers for the same cores,
which a PACS on its own server does not). The best run of each source is compared. Numbers depend on the machine and its load (printed); compare lines of one run only.
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

from bench_pacs import DATE, make_corpus  # noqa: E402
from orthanc import Orthanc  # noqa: E402

from tasks.dicom import synth  # noqa: E402


class ShardClock:
    """Listens to ``flows.progress``: (time, files seen) at each stored shard."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []
        self.started = time.perf_counter()

    def __call__(self, event: str, data: dict) -> None:
        if event == "shard":
            self.marks.append((time.perf_counter(), int(data["seen"])))

    def steady(self) -> float:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")

    def whole(self) -> float:
        t1, n1 = self.marks[-1]
        return n1 / (t1 - self.started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(source: str, params, model: Path, db: Path, home: Path) -> tuple[float, float, dict]:
    from flows import progress
    from flows.screen import screen
    from flows.settings import environment

    clock = ShardClock()
    progress.add_listener(clock)
    try:
        with environment(database_url=f"sqlite:///{db}", home=str(home)):
            summary = screen([source], str(model), params)
    finally:
        progress.remove_listener(clock)
    return clock.steady(), clock.whole(), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=192, help="studies (one instance each)")
    parser.add_argument("--size", type=int, default=1024, help="image rows (columns 0.92x)")
    parser.add_argument("--syntax", default="explicit_le", choices=sorted(synth.SYNTAXES))
    parser.add_argument("--shard-size", type=int, default=24)
    parser.add_argument("--workers", type=int, default=None, help="decode processes")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="keep the corpus here (reused)")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("CXR_SCREEN_HMAC_KEY", "bench-pacs-flow-key")
    os.environ.setdefault("CXR_SCREEN_DEVICE", "cpu")
    print(
        f"# {platform.machine()} cores={os.cpu_count()} python {platform.python_version()} "
        f"load {os.getloadavg()[0]:.2f}"
    )
    from prefect.testing.utilities import prefect_test_harness

    from flows.parameters import ScreenParameters
    from model.checkpoint import untrained_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-pacs-flow-") as tmp_name:
        tmp = Path(tmp_name)
        corpus_dir = args.dir or tmp / "corpus"
        corpus_dir.mkdir(parents=True, exist_ok=True)
        paths = make_corpus(corpus_dir, args.n, args.size, args.syntax)
        total_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"corpus: {len(paths)} x {args.size}px {args.syntax}, {total_mb:.0f} MB")
        model = tmp / "model.pt"
        untrained_checkpoint(version="bench", name="bench", seed=0).save(model)
        common = {"shard_size": args.shard_size, "workers": args.workers}
        folder_params = ScreenParameters(**common)
        day = f"{DATE[:4]}-{DATE[4:6]}-{DATE[6:]}"
        web_params = ScreenParameters(**common, study_date=day, connections=args.connections)
        with Orthanc(tmp / "orthanc") as pacs, prefect_test_harness(server_startup_timeout=None):
            pacs.upload_files(paths)
            os.environ.update(
                {
                    "CXR_SCREEN_PACS__BENCH__URL": pacs.dicomweb_url,
                    "CXR_SCREEN_PACS__BENCH__USERNAME": pacs.username,
                    "CXR_SCREEN_PACS__BENCH__PASSWORD": pacs.password,
                }
            )
            rates: dict[str, list[tuple[float, float]]] = {"folder": [], "dicomweb": []}
            for i in range(args.repeat):
                for kind, source, params in (
                    ("folder", str(corpus_dir), folder_params),
                    ("dicomweb", "pacs://bench", web_params),
                ):
                    orthanc_before = cpu_seconds(pacs._proc.pid)
                    steady, whole, summary = one_run(
                        source, params, model, tmp / f"{kind}-{i}.db", tmp / f"home-{kind}-{i}"
                    )
                    orthanc_cpu = cpu_seconds(pacs._proc.pid) - orthanc_before
                    if summary["predicted"] != len(paths):
                        raise RuntimeError(f"{kind}: {summary}")
                    rates[kind].append((steady, whole))
                    print(
                        f"{kind:8s} run {i + 1}: steady {steady:6.1f} images/s, whole run "
                        f"{whole:6.1f} images/s ({summary['seconds']:.1f}s; Orthanc used "
                        f"{orthanc_cpu:.1f} CPU-s; load {os.getloadavg()[0]:.1f})"
                    )
    best = {k: max(s for s, _ in v) for k, v in rates.items()}
    ratio = best["dicomweb"] / best["folder"]
    medians = {k: statistics.median(s for s, _ in v) for k, v in rates.items()}
    print(
        f"RESULT steady_images_per_s folder={best['folder']:.1f} dicomweb={best['dicomweb']:.1f} "
        f"ratio={ratio:.2f} (target >= 0.75; medians {medians['folder']:.1f} / "
        f"{medians['dicomweb']:.1f})"
    )


if __name__ == "__main__":
    main()
