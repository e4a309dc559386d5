"""Labelled training data from DICOM files, through the same pixel path as inference.

Two layouts are accepted:

- a folder with one sub-folder per class (``normal/``, ``abnormal/``...): the class names are
  the sub-folder names, sorted; every file under a class folder (archives included) gets that
  class;
- a CSV file with ``path`` and ``label`` columns: paths are relative to the CSV (or absolute)
  and may name files, folders or archives.

Every file goes through the header scan and selection (``tasks.ingest.scan_file``) and the
pixel path (``tasks.ingest.decode_item``, in the decode workers of ``tasks/decode_pool.py``)
exactly as a screening run would treat it, with the checkpoint's preprocessing spec. A file
that is skipped or fails is counted with its reason, never fatal. The images are kept in
memory as one tensor (one channel when the spec's channels are identical, expanded on access).

The train/validation split is by group: files that share a study or a patient (keyed hash)
always land on the same side, so no study and no patient is in both. It is stratified by the
group's class and seeded.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from model.spec import PreprocessSpec
from tasks.decode_pool import DecodePool
from tasks.dicom.discovery import DEFAULT_LIMITS, ArchiveLimits, discover
from tasks.dicom.headers import InstanceHeader
from tasks.dicom.outcomes import Outcome
from tasks.dicom.selection import DEFAULT_POLICY, SelectionPolicy
from tasks.ingest import NO_HEADER_REASON, ScanItem, scan_file

POSITIVE_NAMES = ("positive", "abnormal")
"""Class names taken as the positive class when none is given (case-insensitive)."""

Progress = Callable[[str, int, int | None], None]
"""``on_progress(stage, done, total)``: stage is ``scan`` or ``decode``; total may be None."""


class TrainingDataError(ValueError):
    """The data cannot make a training set (no classes, a class without images...)."""


@dataclass(frozen=True)
class LabelledSource:
    """A file, folder or archive whose DICOM files all carry ``label``."""

    path: str
    label: str


def folder_sources(root: str | os.PathLike[str]) -> list[LabelledSource]:
    """One source per class sub-folder of ``root`` (hidden folders ignored), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise TrainingDataError(f"training data folder {str(root)!r} is not a directory")
    classes = sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )
    if len(classes) < 2:
        raise TrainingDataError(
            f"training data folder {str(root)!r} needs one sub-folder per class (at least two); "
            f"found {classes or 'none'}"
        )
    return [LabelledSource(str(root / name), name) for name in classes]


def csv_sources(
    csv_path: str | os.PathLike[str], path_column: str = "path", label_column: str = "label"
) -> list[LabelledSource]:
    """The (path, label) rows of a CSV; relative paths are taken relative to the CSV's folder."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in (path_column, label_column) if c not in columns]
            if missing:
                raise TrainingDataError(
                    f"labels CSV {str(csv_path)!r} lacks column(s) {', '.join(missing)}; "
                    f"it has {', '.join(columns) or 'no header'}"
                )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingDataError(f"labels CSV {str(csv_path)!r} cannot be read: {exc}") from None
    sources = []
    for line, row in enumerate(rows, start=2):
        path, label = (row.get(path_column) or "").strip(), (row.get(label_column) or "").strip()
        if not path or not label:
            raise TrainingDataError(
                f"labels CSV {str(csv_path)!r} line {line}: both {path_column!r} and "
                f"{label_column!r} must be non-empty"
            )
        full = Path(path) if Path(path).is_absolute() else csv_path.parent / path
        sources.append(LabelledSource(str(full), label))
    if not sources:
        raise TrainingDataError(f"labels CSV {str(csv_path)!r} has no rows")
    return sources


def labelled_sources(
    data: str | os.PathLike[str], label_column: str = "label"
) -> tuple[str, list[LabelledSource]]:
    """``("folder" | "csv", sources)`` for a class-per-sub-folder tree or a CSV of path,label."""
    path = Path(data)
    if path.is_dir():
        return "folder", folder_sources(path)
    if path.is_file():
        return "csv", csv_sources(path, label_column=label_column)
    raise TrainingDataError(f"training data {str(path)!r} does not exist")


def choose_positive(class_names: list[str], positive_class: str | None = None) -> str:
    """The positive class: the one given, else ``positive``/``abnormal`` if present, else the
    last class name in sorted order."""
    if positive_class is not None:
        if positive_class not in class_names:
            raise TrainingDataError(
                f"positive class {positive_class!r} is not one of the classes {class_names}"
            )
        return positive_class
    for name in class_names:
        if name.lower() in POSITIVE_NAMES:
            return name
    return class_names[-1]


class ImageDataset(Dataset):
    """Preprocessed images with integer labels, as ``(image, label)`` pairs.

    ``images`` is (N, c, H, W) float32 with c either ``channels`` or 1; a single stored channel
    is expanded (a view, no copy) to ``channels`` on access.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        channels: int,
        studies: list[str] | None = None,
        groups: list[int] | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, channels):
            raise ValueError(
                f"images should be shaped (N, 1 or {channels}, H, W), got {tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.channels = channels
        self.studies = studies or [""] * len(images)
        self.groups = groups or list(range(len(images)))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1)
        return x, self.labels[i]

    def subset(self, indices: Iterable[int]) -> ImageDataset:
        idx = list(indices)
        picked = torch.as_tensor(idx, dtype=torch.long)
        return ImageDataset(
            self.images[picked],
            self.labels[picked],
            self.channels,
            [self.studies[i] for i in idx],
            [self.groups[i] for i in idx],
        )

    def class_counts(self, class_names: list[str]) -> dict[str, int]:
        counts = np.bincount(self.labels.numpy(), minlength=len(class_names))
        return {name: int(n) for name, n in zip(class_names, counts, strict=True)}


@dataclass
class DatasetReport:
    """What went into a training set and what was left out, with reasons (no identifiers)."""

    source: str
    layout: str  # "folder" or "csv"
    class_names: list[str]
    positive_class: str
    files_seen: int = 0
    used: int = 0
    skipped: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)
    per_class: dict[str, int] = field(default_factory=dict)
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)
    studies_per_split: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    val_fraction: float = 0.2

    def run_counts(self) -> dict[str, int]:
        """Counts for the ``runs`` table: a used file counts as *predicted*."""
        return {
            "files_seen": self.files_seen,
            "predicted": self.used,
            "skipped": self.skipped,
            "failed": self.failed,
        }

    def to_dict(self, top_reasons: int = 10) -> dict[str, Any]:
        return {
            "source": self.source,
            "layout": self.layout,
            "class_names": list(self.class_names),
            "positive_class": self.positive_class,
            "files_seen": self.files_seen,
            "used": self.used,
            "skipped": self.skipped,
            "failed": self.failed,
            "top_reasons": [
                {"reason": r, "files": n} for r, n in self.reasons.most_common(top_reasons)
            ],
            "per_class": dict(self.per_class),
            "per_split": {k: dict(v) for k, v in self.per_split.items()},
            "studies_per_split": dict(self.studies_per_split),
            "split": "by study and patient, stratified by class",
            "seed": self.seed,
            "val_fraction": self.val_fraction,
        }


@dataclass
class TrainingData:
    train: ImageDataset
    validation: ImageDataset
    report: DatasetReport
    spec: PreprocessSpec

    @property
    def class_names(self) -> list[str]:
        return self.report.class_names

    @property
    def positive_class(self) -> str:
        return self.report.positive_class


DUPLICATE_REASON = "duplicate SOP Instance UID: the same image is listed twice; the first is used"
CONFLICT_REASON = (
    "the same SOP Instance UID is labelled with two different classes: its label is unknown, "
    "so no copy is used"
)


def build_training_data(
    data: str | os.PathLike[str],
    spec: PreprocessSpec,
    *,
    hmac_key: bytes,
    policy: SelectionPolicy = DEFAULT_POLICY,
    positive_class: str | None = None,
    label_column: str = "label",
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 0,
    reduced: bool = True,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    on_progress: Progress | None = None,
) -> TrainingData:
    """Scan, select, decode and split a labelled folder or CSV into train and validation sets.

    Raises :class:`TrainingDataError` only for problems with the data as a whole (no classes,
    no usable image of a class, too few studies to split); single files never raise.
    """
    if not 0.0 < val_fraction < 1.0:
        raise TrainingDataError(f"val_fraction should lie in (0, 1) instead of {val_fraction}")
    layout, sources = labelled_sources(data, label_column)
    class_names = sorted({s.label for s in sources})
    if len(class_names) < 2:
        raise TrainingDataError(
            f"training data {str(data)!r} has {len(class_names)} class(es) {class_names}; "
            "at least two are needed"
        )
    report = DatasetReport(
        source=str(data),
        layout=layout,
        class_names=class_names,
        positive_class=choose_positive(class_names, positive_class),
        seed=seed,
        val_fraction=val_fraction,
    )
    index = {name: i for i, name in enumerate(class_names)}
    selected = _scan(sources, index, report, hmac_key, policy, limits, on_progress)
    full = _decode(selected, spec, report, workers, reduced, on_progress)
    report.per_class = full.class_counts(class_names)
    empty = [name for name, n in report.per_class.items() if n == 0]
    if empty:
        raise TrainingDataError(
            f"no usable image of class(es) {', '.join(map(repr, empty))} in {str(data)!r} "
            f"({report.files_seen} files seen, {report.skipped} skipped, {report.failed} failed; "
            f"top reason: {_top_reason(report)})"
        )
    train, validation = _split(full, report, val_fraction, seed)
    return TrainingData(train, validation, report, spec)


Selected = list[tuple[ScanItem, InstanceHeader, int]]
"""The files to decode: each with its header and its class index."""


def _scan(
    sources: list[LabelledSource],
    index: dict[str, int],
    report: DatasetReport,
    hmac_key: bytes,
    policy: SelectionPolicy,
    limits: ArchiveLimits,
    on_progress: Progress | None,
) -> Selected:
    """Step 1: header scan + selection, exactly as a screening run does it; one copy of each
    image (none of an image filed under two classes: its label is unknown)."""
    by_uid: dict[str, Selected] = {}
    for source in sources:
        for src in discover([source.path], limits):
            item = scan_file(src, policy, hmac_key)
            report.files_seen += 1
            if item.outcome is not None:
                _count(report, item.outcome, item.reason or "")
            elif item.header is None:  # scan_file never leaves a selected file without one
                _count(report, Outcome.FAILED, NO_HEADER_REASON)
            else:
                uid = item.header.sop_instance_uid
                by_uid.setdefault(uid, []).append((item, item.header, index[source.label]))
            if on_progress:
                on_progress("scan", report.files_seen, None)
    selected: Selected = []
    for copies in by_uid.values():
        if len({label for _, _, label in copies}) > 1:
            for _ in copies:
                _count(report, Outcome.SKIPPED, CONFLICT_REASON)
            continue
        selected.append(copies[0])
        for _ in copies[1:]:
            _count(report, Outcome.SKIPPED, DUPLICATE_REASON)
    return selected


def _decode(
    selected: Selected,
    spec: PreprocessSpec,
    report: DatasetReport,
    workers: int,
    reduced: bool,
    on_progress: Progress | None,
) -> ImageDataset:
    """Step 2: decode + preprocess in the decode workers (the screening run's pool); the
    images that decoded, with their labels, studies and patient groups."""
    compact = len(set(spec.mean)) == 1 and len(set(spec.std)) == 1
    stored = 1 if compact else spec.channels
    images = torch.empty((len(selected), stored, spec.input_size, spec.input_size))
    labels: list[int] = []
    studies: list[str] = []
    patients: list[str | None] = []
    args = [
        (item.source, h.sop_instance_uid, spec.to_dict(), reduced, None) for item, h, _ in selected
    ]
    processes = min(max(workers, 0), len(args)) if len(args) > 1 else 0
    with DecodePool(processes, max_chunk=16) as pool:
        decoded = pool.results(pool.start(args))
        for n, ((_, h, label), dec) in enumerate(zip(selected, decoded, strict=True), start=1):
            if dec.error is not None or dec.image is None:
                _count(report, Outcome.FAILED, dec.error or "decoding returned no image")
            else:
                images[len(labels)] = torch.from_numpy(dec.image[:stored])
                labels.append(label)
                studies.append(h.study_instance_uid)
                patients.append(h.patient_id_hash)
                report.used += 1
            if on_progress:
                on_progress("decode", n, len(selected))
    labelled = torch.tensor(labels, dtype=torch.long)
    groups = group_ids(studies, patients)
    return ImageDataset(images[: len(labels)], labelled, spec.channels, studies, groups)


def _split(
    full: ImageDataset, report: DatasetReport, val_fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """Step 3: split by group (study + patient), stratified, seeded; every class on both
    sides or a ``TrainingDataError`` that says why not."""
    train_idx, val_idx = split_groups(full.groups, full.labels.tolist(), val_fraction, seed)
    train, validation = full.subset(train_idx), full.subset(val_idx)
    for split_name, part in (("train", train), ("validation", validation)):
        report.per_split[split_name] = part.class_counts(report.class_names)
        report.studies_per_split[split_name] = len(set(part.studies))
    missing = [
        f"{split_name} has no {name!r} image"
        for split_name, counts in report.per_split.items()
        for name, n in counts.items()
        if n == 0
    ]
    if missing:
        raise TrainingDataError(
            "cannot split the data by study into training and validation sets with every class "
            f"on both sides ({'; '.join(missing)}): each class needs images from at least two "
            f"studies (per class: {report.per_class}, studies per split: "
            f"{report.studies_per_split})"
        )
    return train, validation


def _count(report: DatasetReport, outcome: Outcome, reason: str) -> None:
    if outcome == Outcome.FAILED:
        report.failed += 1
    else:
        report.skipped += 1
    report.reasons[reason] += 1


def _top_reason(report: DatasetReport) -> str:
    top = report.reasons.most_common(1)
    return f"{top[0][0]!r} ({top[0][1]} files)" if top else "none"


def group_ids(studies: list[str], patients: list[str | None]) -> list[int]:
    """One group id per image: images connected by a shared study or patient share a group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for study, patient in zip(studies, patients, strict=True):
        a = find(f"s:{study}")
        if patient:
            b = find(f"p:{patient}")
            if a != b:
                parent[b] = a
    roots: dict[str, int] = {}
    return [roots.setdefault(find(f"s:{s}"), len(roots)) for s in studies]


def split_groups(
    groups: list[int], labels: list[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Image indices for training and validation; whole groups go to one side.

    Groups are stratified by their most common label; within each stratum a seeded shuffle
    puts ``round(val_fraction * n)`` groups (at least one, and at most n - 1, when the stratum
    has two or more) in validation.
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    strata: dict[int, list[int]] = {}
    for g in sorted(members):
        group_label = Counter(labels[i] for i in members[g]).most_common(1)[0][0]
        strata.setdefault(group_label, []).append(g)
    rng = np.random.default_rng(seed)
    val_groups: set[int] = set()
    for label in sorted(strata):
        gs = strata[label]
        order = rng.permutation(len(gs))
        n_val = round(val_fraction * len(gs))
        if len(gs) >= 2:
            n_val = min(max(n_val, 1), len(gs) - 1)
        val_groups.update(gs[j] for j in order[:n_val])
    train_idx = [i for i, g in enumerate(groups) if g not in val_groups]
    val_idx = [i for i, g in enumerate(groups) if g in val_groups]
    return train_idx, val_idx
