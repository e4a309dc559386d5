import time

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from model.network import LGMobileNetV2
from model.synthetic import synthetic_batch
from model.training import TrainConfig, build_and_train, train_classifier


def _dataset(n, size, seed):
    images, labels = synthetic_batch(n, size=size, seed=seed)
    x = torch.from_numpy((images - 0.5) / 0.25)[:, None].expand(-1, 3, -1, -1).contiguous()
    return TensorDataset(x, torch.from_numpy(labels))


def test_synthetic_classes_do_not_differ_in_mean_brightness():
    images, labels = synthetic_batch(400, size=64, seed=5)
    means = images.mean(axis=(1, 2))
    assert abs(means[labels == 1].mean() - means[labels == 0].mean()) < 0.01


@pytest.mark.timeout(1800)  # ~1.5 min on an idle 2-core machine, 10 min seen under heavy load
def test_training_learns_a_faint_localized_pattern():
    torch.set_num_threads(2)
    train, val = _dataset(800, 64, seed=1), _dataset(200, 64, seed=2)
    started = time.perf_counter()
    result = train_classifier(
        LGMobileNetV2(), train, val, TrainConfig(epochs=10, batch_size=32, lr=3e-3, seed=0)
    )
    elapsed = time.perf_counter() - started
    print(f"trained {len(result.history)} epochs in {elapsed:.1f}s: {result.metrics()}")
    assert result.validation.auroc >= 0.95
    assert result.validation.sensitivity >= 0.95  # threshold chosen for the target
    assert 0.0 < result.threshold < 1.0
    assert set(result.state_dict) == set(LGMobileNetV2().state_dict())


def test_training_is_reproducible_with_a_seed():
    train, val = _dataset(64, 48, seed=3), _dataset(32, 48, seed=4)
    cfg = TrainConfig(epochs=2, batch_size=16, seed=7)
    torch.manual_seed(123)  # build_and_train must not depend on the RNG state it finds
    a = build_and_train("lg_mobilenet_v2", {"num_classes": 2}, train, val, cfg)
    b = build_and_train("lg_mobilenet_v2", {"num_classes": 2}, train, val, cfg)
    assert [r["val_auroc"] for r in a.history] == [r["val_auroc"] for r in b.history]
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert np.isfinite(a.history[-1]["train_loss"])
