"""The training loop (plain PyTorch): AdamW, cosine schedule, class weights, early stopping.

Inputs are datasets of ``(image_tensor, label)`` already preprocessed with the checkpoint's
spec (``tasks.dicom.pixels`` for DICOM), so training and inference see identical pixels.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from model.metrics import BinaryReport, auroc, binary_report, threshold_for_sensitivity
from model.predictor import resolve_device


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 6  # epochs without a better validation AUROC before stopping
    target_sensitivity: float = 0.95
    positive_index: int = 1
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs should be at least 1 instead of {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size should be at least 2 instead of {self.batch_size}")


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    threshold: float
    validation: BinaryReport
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return {
            "validation": self.validation.to_dict(),
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
            "train_seconds": round(self.seconds, 1),
        }


class Augmented(Dataset):
    """Modest, anatomy-preserving augmentation: small affine jitter and intensity jitter.

    No flips: the heart's side is part of what a chest radiograph looks like.
    """

    def __init__(self, base: Dataset, strength: float = 1.0) -> None:
        self.base = base
        self.affine = v2.RandomAffine(
            degrees=5 * strength,
            translate=(0.04 * strength, 0.04 * strength),
            scale=(1 - 0.05 * strength, 1 + 0.05 * strength),
        )
        self.strength = strength

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        x = self.affine(x)
        gain = 1.0 + (torch.rand(()) - 0.5) * 0.2 * self.strength
        bias = (torch.rand(()) - 0.5) * 0.2 * self.strength
        return x * gain + bias, y


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _labels_of(ds: Dataset) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is None and hasattr(ds, "tensors"):
        labels = ds.tensors[1]
    if labels is None:
        labels = [ds[i][1] for i in range(len(ds))]  # type: ignore[arg-type]
    return np.asarray(torch.as_tensor(labels)).astype(np.int64)


@torch.inference_mode()
def predict_scores(
    net: nn.Module, ds: Dataset, positive_index: int, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    net.eval()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    out = []
    for x, _ in loader:
        logits = net(x.to(device))
        out.append(torch.softmax(logits.float(), 1)[:, positive_index].cpu())
    return torch.cat(out).numpy()


def train_classifier(
    net: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    config: TrainConfig | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``net`` in place and return the best weights (by validation AUROC) and metrics."""
    cfg = config or TrainConfig()
    started = time.perf_counter()
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    net.to(device)

    train_labels = _labels_of(train_ds)
    val_labels = _labels_of(val_ds)
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64)
    if np.any(counts == 0):
        raise ValueError(
            f"every class needs training examples; counts per class: {counts.tolist()}"
        )
    if len(np.unique(val_labels)) < 2:
        raise ValueError("the validation set needs examples of both classes to compute AUROC")
    # Inverse-frequency class weights, normalised so that a balanced set gets weight 1.
    weights = torch.tensor(counts.sum() / (n_classes * counts), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=weights)

    loader = DataLoader(
        Augmented(train_ds) if cfg.augment else train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_ds) > cfg.batch_size,  # type: ignore[arg-type]
        generator=generator,
        num_workers=cfg.num_workers,
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(loader))
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    best_auc, best_epoch, best_state, stale = -1.0, 0, None, 0
    history: list[dict[str, Any]] = []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        running, seen = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), torch.as_tensor(y, device=device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(y)
            seen += len(y)
        scores = predict_scores(net, val_ds, cfg.positive_index, device)
        val_auc = auroc(scores, val_labels == cfg.positive_index)
        row = {
            "epoch": epoch,
            "train_loss": running / max(1, seen),
            "val_auroc": val_auc,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if val_auc > best_auc:
            best_auc, best_epoch, stale = val_auc, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        else:
            stale += 1
            if stale >= cfg.patience:
                break

    assert best_state is not None  # at least one epoch ran
    net.load_state_dict(best_state)
    scores = predict_scores(net, val_ds, cfg.positive_index, device)
    positives = val_labels == cfg.positive_index
    threshold = threshold_for_sensitivity(scores, positives, cfg.target_sensitivity)
    report = binary_report(scores, positives, threshold)
    return TrainResult(
        state_dict=best_state,
        best_epoch=best_epoch,
        threshold=threshold,
        validation=report,
        history=history,
        config=asdict(cfg),
        seconds=time.perf_counter() - started,
    )


def build_and_train(
    architecture: str,
    arch_kwargs: dict[str, Any],
    train_ds: Dataset,
    val_ds: Dataset,
    config: TrainConfig | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Seed, then build the network (so its initial weights follow the seed too), then train.

    The reproducible entry point: two calls with the same data and config give the same
    weights bit for bit on CPU.
    """
    from model.network import build_model

    seed_everything((config or TrainConfig()).seed)
    net = build_model(architecture, **arch_kwargs)
    return train_classifier(net, train_ds, val_ds, config, on_epoch)
