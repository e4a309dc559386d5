"""Classification metrics for a binary screen (no external dependencies beyond numpy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {labels.size}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    return scores, labels


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties).

    Returns NaN when only one class is present, where the AUROC is undefined.
    """
    scores, labels = _check(scores, labels)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # mid-ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def threshold_for_sensitivity(
    scores: np.ndarray, labels: np.ndarray, target: float = 0.95
) -> float:
    """The highest threshold whose sensitivity (score >= threshold) reaches ``target``."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity should lie in (0, 1] instead of {target}")
    scores, labels = _check(scores, labels)
    pos = np.sort(scores[labels])[::-1]
    if pos.size == 0:
        raise ValueError("no positive examples: cannot choose a threshold for a sensitivity")
    k = int(np.ceil(target * pos.size))  # positives that must be at or above the threshold
    return float(pos[k - 1])


@dataclass(frozen=True)
class BinaryReport:
    auroc: float
    threshold: float
    sensitivity: float
    specificity: float
    tp: int
    fp: int
    tn: int
    fn: int
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def binary_report(scores: np.ndarray, labels: np.ndarray, threshold: float) -> BinaryReport:
    scores, labels = _check(scores, labels)
    pred = scores >= threshold
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    tn = int(np.sum(~pred & ~labels))
    fn = int(np.sum(~pred & labels))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return BinaryReport(
        auroc=auroc(scores, labels),
        threshold=float(threshold),
        sensitivity=sens,
        specificity=spec,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        n=int(labels.size),
    )
