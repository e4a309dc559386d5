"""Wall time of ``cxr-screen demo`` by stage, and how well the demo model does.

    .venv/bin/python benchmarks/bench_demo.py                 # the full demo (cli.demo.FULL)
    .venv/bin/python benchmarks/bench_demo.py --quick         # the size the tests use
    taskset -c 0,1 .venv/bin/python benchmarks/bench_demo.py  # on 2 cores of a bigger machine

Runs ``cli.demo.run_demo`` in a temporary directory (or --dir) through the real flows (a
temporary Prefect server is started unless PREFECT_API_URL is set) and prints one line per
stage: data generation, training (the whole train flow, server start included) and screening,
the training throughput (images per second, forward + backward, from the epochs run) and the
validation and archive AUROC. Numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small size the tests use")
    parser.add_argument("--dir", type=Path, help="demo directory (default: a temporary one)")
    parser.add_argument("--epochs", type=int, help="override the plan's epochs")
    args = parser.parse_args()

    from cli.console import quiet_console
    from cli.demo import run_demo

    quiet_console()
    import torch

    directory = args.dir or Path(tempfile.mkdtemp(prefix="cxr-bench-demo-")) / "demo"
    print(
        f"cores available {len(os.sched_getaffinity(0))}, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    started = time.perf_counter()
    result = run_demo(directory, quick=args.quick, epochs=args.epochs)
    total = time.perf_counter() - started
    plan, train, s = result["plan"], result["train"], result["seconds"]
    n_train = sum(train["dataset"]["per_split"]["train"].values())
    per_epoch = train["train_seconds"] / max(1, train["epochs_run"])
    print(
        f"plan: archive {plan['archive_studies']} studies {plan['archive_sizes']} px, "
        f"training {plan['train_studies']} studies {plan['train_sizes']} px, "
        f"{plan['epochs']} epochs at input {plan['input_size']}"
    )
    print(f"generate  {s['generate']:7.1f} s")
    print(f"train     {s['train']:7.1f} s  (loop {train['train_seconds']} s)")
    print(f"screen    {s['screen']:7.1f} s")
    print(f"total     {total:7.1f} s")
    print(
        f"training: {n_train} images x {train['epochs_run']} epochs, {per_epoch:.1f} s/epoch, "
        f"~{n_train / per_epoch:.1f} images/s (forward + backward, plus validation)"
    )
    ev = result["archive_evaluation"]
    print(
        f"validation AUROC {train['auroc']:.3f}; archive ({ev.get('studies', 0)} studies) "
        f"AUROC {ev.get('auroc', float('nan')):.3f}, sensitivity "
        f"{ev.get('sensitivity', float('nan')):.3f}, specificity "
        f"{ev.get('specificity', float('nan')):.3f}"
    )


if __name__ == "__main__":
    main()
