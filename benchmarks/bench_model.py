"""Inference throughput of the classifiers: images/s per configuration.

    python benchmarks/bench_model.py                 # CPU: fp32, channels_last, torch.compile
    python benchmarks/bench_model.py --device cuda   # + CUDA with AMP when a GPU is present

Prints one line per configuration. Numbers depend on the machine: record them with its name.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.network import build_model


def measure(net, batch: int, size: int, device: torch.device, amp: bool, seconds: float) -> float:
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if amp
        else torch.autocast("cpu", enabled=False)
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), ctx:
        for _ in range(3):  # warm-up (and compilation)
            net(x)
        sync()
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            net(x)
            n += batch
        sync()
    return n / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, {device.type} ({name}), threads={torch.get_num_threads()}")
    for arch in ("lg_mobilenet_v2", "torchvision_mobilenet_v2"):
        base = build_model(arch, num_classes=2).eval().to(device)
        base = base.to(memory_format=torch.channels_last)
        variants = [("eager", base)]
        if not args.no_compile:
            variants.append(("compile", torch.compile(base)))
        for mode, net in variants:
            for amp in [False, True] if device.type == "cuda" else [False]:
                for batch in (int(b) for b in args.batches.split(",")):
                    rate = measure(net, batch, 150, device, amp, args.seconds)
                    precision = "amp-bf16" if amp else "fp32"
                    print(
                        f"{arch:26s} {device.type:4s} {precision:8s} {mode:7s} "
                        f"batch={batch:<5d} {rate:10.1f} images/s",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
