import dataclasses
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from model.checkpoint import (
    Checkpoint,
    CheckpointError,
    import_state_dict,
    load_checkpoint,
    untrained_checkpoint,
)
from model.network import LGMobileNetV2
from model.predictor import Predictor
from model.spec import PreprocessSpec


# The seed notebook's classes, written the way the exercise intends them once its blanks are
# filled: a state_dict trained with these must load into model.network.LGMobileNetV2.
class SeedConvBNReLU(nn.Module):
    def __init__(self, inplanes, outplanes, kernel_size, stride, groups, act=True):
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            inplanes, outplanes, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(outplanes)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SeedInvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio, shortcut):
        super().__init__()
        self.shortcut = shortcut
        hidden_dim = round(inp * expand_ratio)
        self.expand_pw = SeedConvBNReLU(inp, hidden_dim, 1, 1, 1)
        self.depthwise = SeedConvBNReLU(hidden_dim, hidden_dim, 3, stride, hidden_dim)
        self.squeeze_pw = SeedConvBNReLU(hidden_dim, oup, 1, 1, 1, act=False)

    def forward(self, x):
        x1 = self.squeeze_pw(self.depthwise(self.expand_pw(x)))
        return x + x1 if self.shortcut else x1


class SeedLGMobileNetV2(nn.Module):
    def __init__(self, num_classes=2):
        super().__init__()
        self.stem = SeedConvBNReLU(3, 16, 3, 2, 1)
        self.block1 = SeedInvertedResidual(16, 16, 1, 1, True)
        self.block2 = SeedInvertedResidual(16, 32, 2, 6, False)
        self.block3 = SeedInvertedResidual(32, 64, 2, 6, False)
        self.block4 = SeedInvertedResidual(64, 64, 1, 6, True)
        self.block5 = SeedInvertedResidual(64, 128, 2, 6, False)
        self.block6 = SeedInvertedResidual(128, 128, 2, 6, False)
        self.block7 = SeedInvertedResidual(128, 128, 1, 6, True)
        self.block8 = SeedInvertedResidual(128, 128, 2, 6, False)
        self.pool = nn.AvgPool2d(kernel_size=3)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x1 = self.stem(x)
        for i in range(1, 9):
            x1 = getattr(self, f"block{i}")(x1)
        x1 = self.pool(x1)
        return self.classifier(x1.reshape(x.shape[0], -1))


def _randomise_bn(net):
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def make_checkpoint(**overrides) -> Checkpoint:
    """An untrained checkpoint with random batch-norm statistics and some metadata."""
    ckpt = untrained_checkpoint(version="test-1", name="cxr-screen", threshold=0.42)
    net = ckpt.build()
    _randomise_bn(net)
    fields = dict(
        state_dict=net.state_dict(),
        provenance={"trained_on": "unit test"},
        metrics={"validation": {"auroc": 0.9}},
    )
    fields.update(overrides)
    return dataclasses.replace(ckpt, **fields)


def test_seed_style_state_dict_imports_and_matches_outputs(tmp_path):
    torch.manual_seed(1)
    seed_net = SeedLGMobileNetV2()
    _randomise_bn(seed_net)
    seed_net.eval()
    torch.save(seed_net.state_dict(), tmp_path / "seed.pth")
    ckpt = import_state_dict(tmp_path / "seed.pth", version="seed-import")
    ours = ckpt.build()
    x = torch.randn(4, 3, 150, 150)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), seed_net(x), rtol=0, atol=1e-6)


def test_import_names_the_first_mismatched_key(tmp_path):
    sd = LGMobileNetV2().state_dict()
    sd["block3.depthwise.conv.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointError, match=r"'block3\.depthwise\.conv\.weight' has shape \(1, 1, 3, 3\)"
    ):
        import_state_dict(tmp_path / "bad.pth", version="x")
    sd = LGMobileNetV2().state_dict()
    del sd["classifier.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing key 'classifier.bias'"):
        import_state_dict(tmp_path / "missing.pth", version="x")


def test_round_trip_is_bit_identical(tmp_path):
    ckpt = make_checkpoint()
    sha = ckpt.save(tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.sha256 == sha and len(sha) == 64
    assert loaded.metadata() == ckpt.metadata()
    assert loaded.preprocessing.sha256 == PreprocessSpec().sha256
    x = torch.randn(5, 3, 150, 150)
    with torch.no_grad():
        a, b = ckpt.build()(x), loaded.build()(x)
    assert torch.equal(a, b)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"format": "cxr-screen-checkpoint/1", "evil": _Exploit(marker)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused.*weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # A raw pickle (not a torch zip) is refused as well, without running anything.
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_truncated_or_foreign_files_give_clear_errors(tmp_path):
    ckpt = make_checkpoint()
    ckpt.save(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save(LGMobileNetV2().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    assert zipfile.is_zipfile(tmp_path / "m.pt")


def test_untrained_checkpoint_is_reproducible_and_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = untrained_checkpoint(version="u-1", seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # global random state untouched
    b = untrained_checkpoint(version="u-1", seed=7)
    assert a.version == "u-1" and a.name == "untrained" and a.threshold == 0.5
    assert a.class_names == ["normal", "abnormal"] and a.positive_class == "abnormal"
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    other = untrained_checkpoint(seed=8)
    assert not torch.equal(a.state_dict["stem.conv.weight"], other.state_dict["stem.conv.weight"])
    # Same weights as building the network right after torch.manual_seed(seed).
    torch.manual_seed(7)
    assert torch.equal(
        LGMobileNetV2().state_dict()["classifier.weight"], a.state_dict["classifier.weight"]
    )
    # head_std re-draws only the classifier's weights (uncalibrated batch norm still leaves
    # every score at ~0.5: head_std alone does not make scores depend on the pixels).
    wide = untrained_checkpoint(version="u-1", seed=7, head_std=2.0)
    assert 1.0 < float(wide.state_dict["classifier.weight"].std()) < 3.0
    assert all(
        torch.equal(wide.state_dict[k], a.state_dict[k])
        for k in a.state_dict
        if k != "classifier.weight"
    )
    # It saves and loads like any checkpoint; other architectures work too.
    sha = wide.save(tmp_path / "u.pt")
    assert load_checkpoint(tmp_path / "u.pt").sha256 == sha
    tv = untrained_checkpoint("torchvision_mobilenet_v2", head_std=1.0)
    assert tv.build()(torch.zeros(1, 3, 150, 150)).shape == (1, 2)


def test_metadata_is_validated():
    with pytest.raises(CheckpointError, match="positive class 'sick' is not one of"):
        make_checkpoint(positive_class="sick")
    with pytest.raises(CheckpointError, match="threshold 1.5"):
        make_checkpoint(threshold=1.5)


def test_predictor_is_batch_size_invariant(tmp_path):
    make_checkpoint().save(tmp_path / "m.pt")
    pred = Predictor(tmp_path / "m.pt", device="cpu")
    x = torch.randn(64, 3, 150, 150)
    full = pred.predict(x, batch_size=64)
    ones = pred.predict(x, batch_size=1)
    assert full.shape == (64,)
    assert float(abs(full - ones).max()) <= 1e-5
    assert ((full >= 0) & (full <= 1)).all()
    # positive-class probability: consistent with the softmax of the logits
    with torch.no_grad():
        logits = pred.checkpoint.build()(x[:3])
    torch.testing.assert_close(
        torch.from_numpy(full[:3]), torch.softmax(logits, 1)[:, 1], rtol=0, atol=1e-5
    )
    assert list(pred.label([0.1, 0.42, 0.9])) == [False, True, True]


def test_predictor_rejects_wrong_shapes_and_missing_gpu(tmp_path):
    make_checkpoint().save(tmp_path / "m.pt")
    pred = Predictor(tmp_path / "m.pt", device="cpu")
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 3, 150, 150\)"):
        pred.predict(torch.zeros(2, 1, 150, 150))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            Predictor(tmp_path / "m.pt", device="cuda")
