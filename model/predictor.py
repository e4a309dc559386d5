"""Batched inference from a checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import Checkpoint, load_checkpoint


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but no CUDA GPU is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device should be 'auto', 'cpu' or 'cuda[:N]' instead of {device!r}")
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    # Measured (benchmarks/bench_model.py): on CPU this small network is fastest per image at
    # small batches, whose activations stay in cache; on a GPU large batches win. On the 2-core
    # machine, one thread, 240 images: batch 1 9.1 ms/image, 4 6.6, 8 6.5, 16 11.4, 32 13.3.
    return 1024 if device.type == "cuda" else 8


class Predictor:
    """Positive-class probabilities for batches of preprocessed images.

    Inputs are float tensors or arrays of shape (N, C, H, W) produced by the checkpoint's
    preprocessing spec. Runs in ``inference_mode`` with channels_last memory; on CUDA with
    autocast (bf16 where supported, else fp16) unless ``amp=False``.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        device: str = "auto",
        amp: bool | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        )
        self.device = resolve_device(device)
        self.channels_last = channels_last
        self.amp = self.device.type == "cuda" if amp is None else amp
        if self.amp and self.device.type != "cuda":
            raise ValueError("amp=True needs a CUDA device; CPU inference runs in fp32")
        self.amp_dtype = (
            torch.bfloat16
            if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            else torch.float16
        )
        net = self.checkpoint.build().to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = torch.compile(net) if compile else net
        self.positive_index = self.checkpoint.positive_index
        self.input_shape = (
            self.checkpoint.preprocessing.channels,
            self.checkpoint.input_size,
            self.checkpoint.input_size,
        )
        self.batch_size = default_batch_size(self.device)

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities (float32, on CPU) for one batch already shaped (N, C, H, W)."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected a batch of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(batch.shape)}"
            )
        x = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self.net(x)
        probs = torch.softmax(logits.float(), dim=1)[:, self.positive_index]
        return probs.cpu()

    def predict(
        self, images: np.ndarray | torch.Tensor, batch_size: int | None = None
    ) -> np.ndarray:
        """Probabilities for any number of images, in chunks of ``batch_size``."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        n = x.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        bs = batch_size or self.batch_size
        out = [self.predict_tensor(x[i : i + bs]) for i in range(0, n, bs)]
        return torch.cat(out).numpy()

    def label(self, probabilities: np.ndarray) -> np.ndarray:
        """True where the positive-class probability reaches the checkpoint's threshold."""
        return np.asarray(probabilities) >= self.checkpoint.threshold
