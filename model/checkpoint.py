"""Checkpoints: one file with the weights and everything needed to reproduce a prediction.

A checkpoint is a plain dict of tensors, strings and numbers saved with ``torch.save`` and read
back only with ``torch.load(..., weights_only=True)``, so loading one can never run code. Its
sha256 (of the file's bytes) identifies it.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.network import build_model
from model.spec import PreprocessSpec

FORMAT = "cxr-screen-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file or state_dict that cannot be used, with the reason."""


@dataclass
class Checkpoint:
    architecture: str
    arch_kwargs: dict[str, Any]
    class_names: list[str]
    positive_class: str
    threshold: float
    preprocessing: PreprocessSpec
    version: str
    state_dict: Mapping[str, torch.Tensor]
    name: str = "cxr-screen"
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    sha256: str | None = None  # set when read from or written to a file

    def __post_init__(self) -> None:
        if self.positive_class not in self.class_names:
            raise CheckpointError(
                f"positive class {self.positive_class!r} is not one of the class names "
                f"{self.class_names!r}"
            )
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise CheckpointError(f"threshold {self.threshold!r} must lie in [0, 1]")
        n = self.arch_kwargs.get("num_classes")
        if n is not None and n != len(self.class_names):
            raise CheckpointError(
                f"architecture has num_classes={n} but {len(self.class_names)} class names "
                f"were given ({self.class_names!r})"
            )

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    def build(self) -> nn.Module:
        """The network with this checkpoint's weights, in eval mode."""
        net = build_model(self.architecture, **self.arch_kwargs)
        load_state_dict_strict(net, self.state_dict)
        return net.eval()

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-compatible data."""
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "arch_kwargs": dict(self.arch_kwargs),
            "class_names": list(self.class_names),
            "positive_class": self.positive_class,
            "threshold": float(self.threshold),
            "input_size": self.input_size,
            "preprocessing": self.preprocessing.to_dict(),
            "preprocessing_sha256": self.preprocessing.sha256,
            "provenance": dict(self.provenance),
            "metrics": dict(self.metrics),
            "notes": self.notes,
        }

    def save(self, path: str | Path) -> str:
        """Write atomically (temp file + rename) and return the file's sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.metadata()
        payload["state_dict"] = OrderedDict(
            (k, v.detach().cpu().contiguous()) for k, v in self.state_dict.items()
        )
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        self.sha256 = file_sha256(path)
        return self.sha256


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; never unpickles anything but tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was refused: it contains objects other than tensors and "
            f"plain containers, which could run code when loaded (weights_only=True). "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:  # torch raises RuntimeError for zip/truncation problems
        with path.open("rb") as f:
            head = f.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a legacy pickle
            what = "it is empty" if not head else "neither a zip archive nor a pickle"
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a model checkpoint: not a file torch.save "
                f"writes ({what})"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}"
        ) from None
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        hint = (
            " It looks like a bare state_dict: import it with `cxr-screen model import`."
            if isinstance(payload, Mapping)
            and all(isinstance(v, torch.Tensor) for v in payload.values())
            else ""
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {found!r}, expected {FORMAT!r}.{hint}"
        )
    missing = [
        k
        for k in ("architecture", "class_names", "state_dict", "preprocessing")
        if k not in payload
    ]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks field(s): {', '.join(missing)}")
    ckpt = Checkpoint(
        architecture=payload["architecture"],
        arch_kwargs=dict(payload.get("arch_kwargs", {})),
        class_names=list(payload["class_names"]),
        positive_class=payload["positive_class"],
        threshold=float(payload["threshold"]),
        preprocessing=PreprocessSpec.from_dict(payload["preprocessing"]),
        version=str(payload["version"]),
        state_dict=payload["state_dict"],
        name=str(payload.get("name", "cxr-screen")),
        provenance=dict(payload.get("provenance", {})),
        metrics=dict(payload.get("metrics", {})),
        notes=str(payload.get("notes", "")),
    )
    ckpt.sha256 = file_sha256(path)
    return ckpt


def load_state_dict_strict(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load weights, naming the first key that is missing, unexpected or of the wrong shape."""
    expected = net.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise CheckpointError(
                f"state_dict is missing key {key!r} (expected shape {tuple(tensor.shape)})"
            )
        got = state_dict[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(
                f"state_dict value for {key!r} is a {type(got).__name__}, not a tensor"
            )
        if tuple(got.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"state_dict key {key!r} has shape {tuple(got.shape)}, "
                f"the architecture expects {tuple(tensor.shape)}"
            )
    for key in state_dict:
        if key not in expected:
            raise CheckpointError(f"state_dict has unexpected key {key!r} for this architecture")
    net.load_state_dict(state_dict, strict=True)


def import_state_dict(
    state_dict_path: str | Path,
    *,
    architecture: str = "lg_mobilenet_v2",
    class_names: list[str] | None = None,
    positive_class: str | None = None,
    threshold: float = 0.5,
    preprocessing: PreprocessSpec | None = None,
    version: str,
    name: str = "imported",
    notes: str = "",
) -> Checkpoint:
    """Wrap a bare state_dict (e.g. saved from the seed notebook) into a checkpoint.

    The weights are checked against the architecture first: a mismatch raises
    ``CheckpointError`` naming the first offending key.
    """
    path = Path(state_dict_path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"state_dict {str(path)!r} was refused: it holds objects other than tensors "
            f"(weights_only=True). Detail: {str(exc).splitlines()[0]}"
        ) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(sd).__name__}, not a state_dict")
    # Notebooks often save a DataParallel model: strip its prefix.
    sd = OrderedDict((k.removeprefix("module."), v) for k, v in sd.items())
    class_names = class_names or ["normal", "abnormal"]
    positive_class = positive_class or class_names[-1]
    ckpt = Checkpoint(
        architecture=architecture,
        arch_kwargs={"num_classes": len(class_names)},
        class_names=class_names,
        positive_class=positive_class,
        threshold=threshold,
        preprocessing=preprocessing or PreprocessSpec(),
        version=version,
        state_dict=sd,
        name=name,
        provenance={"imported_from": path.name, "source_sha256": file_sha256(path)},
        notes=notes,
    )
    ckpt.build()  # validates keys and shapes
    return ckpt


def untrained_checkpoint(
    architecture: str = "lg_mobilenet_v2",
    *,
    version: str = "untrained",
    name: str = "untrained",
    seed: int = 0,
    head_std: float | None = None,
    threshold: float = 0.5,
    calibrate: bool = False,
) -> Checkpoint:
    """A checkpoint of a freshly initialised network, for tests, benchmarks and smoke runs.

    Two classes (``normal``, ``abnormal``; the positive class is ``abnormal``) and the default
    ``PreprocessSpec``. The weights are those ``torch.manual_seed(seed)`` followed by building
    ``architecture`` gives; the global random state is left as it was. Its scores mean nothing.

    head_std:
        ``None`` keeps the architecture's own initialisation of the final linear layer (for
        LGMobileNetV2, std 0.01: every image scores about 0.5). A number re-draws that layer's
        weights from ``N(0, head_std)``.
    calibrate:
        Set the batch-norm statistics from a forward pass over synthetic chest phantoms, as
        training would. Freshly initialised, LGMobileNetV2's activations shrink ~10x per block
        and every image scores 0.5 to within 1e-6 whatever ``head_std``; calibrated, with
        ``head_std=0.2``, scores spread over (0, 1) and depend on the pixels (what tests and
        benchmarks comparing two code paths need).
    """
    class_names = ["normal", "abnormal"]
    arch_kwargs = {"num_classes": len(class_names)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(architecture, **arch_kwargs)
        if head_std is not None:
            head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.normal_(head.weight, 0.0, head_std)
        if calibrate:
            _calibrate_batch_norm(net, PreprocessSpec())
    return Checkpoint(
        architecture=architecture,
        arch_kwargs=arch_kwargs,
        class_names=class_names,
        positive_class="abnormal",
        threshold=threshold,
        preprocessing=PreprocessSpec(),
        version=version,
        state_dict=net.state_dict(),
        name=name,
        provenance={
            "untrained": True,
            "seed": seed,
            "head_std": head_std,
            "calibrated": calibrate,
        },
    )


def _calibrate_batch_norm(net: nn.Module, spec: PreprocessSpec, batches: int = 4) -> None:
    """Batch-norm running statistics from the synthetic chest phantoms of ``model.synthetic``
    (noise and all: calibrated on smooth images only, the network over-reacts to texture),
    normalised as ``spec`` says."""
    from model.synthetic import synthetic_batch

    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
    net.train()
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        for b in range(batches):
            images, _ = synthetic_batch(32, spec.input_size, seed=b)
            x = torch.from_numpy(images)[:, None].expand(-1, spec.channels, -1, -1)
            net((x - mean) / std)
    net.eval()
