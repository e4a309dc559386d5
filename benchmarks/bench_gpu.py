"""GPU inference throughput of LGMobileNetV2 at 150x150 (a prepared script for a CUDA machine).

    python benchmarks/bench_gpu.py            # about 2-3 minutes on one H100

Measures images/s, inference only (inputs already on the GPU), for fp32 / AMP bf16 / AMP fp16,
channels_last, batch 256-4096, eager, torch.compile and CUDA graphs; then the Predictor path as
the pipeline uses it (float32 batches in pinned host memory, copied non-blocking, AMP), so the
host-to-device copy is counted. Target (issue #6): >= 50,000 images/s inference-only on an
H100-class GPU. Prints one line per configuration and a final BEST line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import untrained_checkpoint
from model.network import LGMobileNetV2
from model.predictor import Predictor


def timed(fn, n_images: int, seconds: float = 2.0) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        reps += 1
    torch.cuda.synchronize()
    return reps * n_images / (time.perf_counter() - started)


def main() -> None:
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    print(
        f"# {torch.cuda.get_device_name()} torch {torch.__version__} cudnn {torch.backends.cudnn.version()}"
    )
    net = LGMobileNetV2().eval().to(dev).to(memory_format=torch.channels_last)
    results = []
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    for mode in ("eager", "compile", "cudagraphs"):
        if mode == "eager":
            model = net
        elif mode == "compile":
            model = torch.compile(net)
        else:
            model = torch.compile(net, mode="reduce-overhead")
        for name, dtype in dtypes.items():
            for batch in (256, 1024, 4096):
                x = torch.randn(batch, 3, 150, 150, device=dev).contiguous(
                    memory_format=torch.channels_last
                )

                def step(x=x, dtype=dtype, model=model):
                    with (
                        torch.inference_mode(),
                        torch.autocast(
                            "cuda", dtype=dtype or torch.float32, enabled=dtype is not None
                        ),
                    ):
                        return model(x)

                try:
                    rate = timed(step, batch)
                except (
                    Exception
                ) as exc:  # report and go on: one failing mode must not hide the rest
                    print(
                        f"{mode:10s} {name:4s} batch={batch:<5d} FAILED {type(exc).__name__}: {exc}"[
                            :200
                        ]
                    )
                    continue
                results.append((rate, mode, name, batch))
                print(f"{mode:10s} {name:4s} batch={batch:<5d} {rate:12.0f} images/s", flush=True)

    ckpt = untrained_checkpoint(version="bench", name="bench")
    pred = Predictor(ckpt, device="cuda")
    for batch in (512, 2048):
        host = torch.randn(batch, 3, 150, 150).pin_memory()
        rate = timed(lambda host=host: pred.predict_tensor(host), batch)
        print(
            f"predictor  {pred.amp_dtype} batch={batch:<5d} {rate:12.0f} images/s (pinned host float32 -> GPU, softmax, back)"
        )
    best = max(results)
    print(
        f"BEST inference-only {best[0]:.0f} images/s ({best[1]}, {best[2]}, batch {best[3]}); target 50000"
    )


if __name__ == "__main__":
    main()
