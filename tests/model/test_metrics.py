import math

import numpy as np
import pytest

from model.metrics import auroc, binary_report, threshold_for_sensitivity


def test_auroc_known_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count half
    # 3 of 4 positive-negative pairs ordered correctly
    assert auroc([0.1, 0.6, 0.4, 0.9], [0, 0, 1, 1]) == 0.75
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 20, 300) / 20  # many ties
    y = rng.integers(0, 2, 300)
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(s, y) == pytest.approx(pairs, abs=1e-12)


def test_threshold_reaches_target_sensitivity():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = rng.random(500) + y * 0.5
    for target in (0.8, 0.95, 1.0):
        t = threshold_for_sensitivity(s, y, target)
        rep = binary_report(s, y, t)
        assert rep.sensitivity >= target
        # the highest such threshold: a hair above it, sensitivity falls below target
        assert binary_report(s, y, np.nextafter(t, 2)).sensitivity < target
    rep = binary_report(s, y, 0.75)
    assert rep.tp + rep.fp + rep.tn + rep.fn == 500
    with pytest.raises(ValueError, match="target sensitivity"):
        threshold_for_sensitivity(s, y, 0)
