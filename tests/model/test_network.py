import pytest
import torch
from torch import nn

from model.network import LG_BLOCKS, LGMobileNetV2, build_model, count_parameters

SEED_SHAPES = [  # from the seed notebook's comments, for a 3x150x150 input
    ("stem", (16, 75, 75)),
    ("block1", (16, 75, 75)),
    ("block2", (32, 38, 38)),
    ("block3", (64, 19, 19)),
    ("block4", (64, 19, 19)),
    ("block5", (128, 10, 10)),
    ("block6", (128, 5, 5)),
    ("block7", (128, 5, 5)),
    ("block8", (128, 3, 3)),
]


def test_block_output_shapes_match_the_seed():
    net = LGMobileNetV2().eval()
    x = torch.randn(2, 3, 150, 150)
    with torch.no_grad():
        for name, shape in SEED_SHAPES:
            x = getattr(net, name)(x)
            assert tuple(x.shape) == (2, *shape), name
        assert net(torch.randn(2, 3, 150, 150)).shape == (2, 2)


def test_residuals_only_where_stride_one_and_channels_kept():
    net = LGMobileNetV2()
    with_shortcut = [i for i in range(1, 9) if getattr(net, f"block{i}").shortcut]
    assert with_shortcut == [1, 4, 7]


def test_expansion_and_activations_follow_the_paper():
    net = LGMobileNetV2()
    assert net.block1.expand_pw.conv.out_channels == 16  # t = 1
    assert net.block2.expand_pw.conv.out_channels == 16 * 6  # t = 6
    for i in range(1, 9):
        block = getattr(net, f"block{i}")
        assert isinstance(block.expand_pw.act, nn.ReLU6)
        assert isinstance(block.depthwise.act, nn.ReLU6)
        assert isinstance(block.squeeze_pw.act, nn.Identity)  # linear bottleneck
        assert block.depthwise.conv.groups == block.depthwise.conv.in_channels


def test_parameter_count():
    assert count_parameters(LGMobileNetV2()) == 782_242
    assert len(LG_BLOCKS) == 8


def test_pool_equals_seed_avgpool_at_150_and_works_at_other_sizes():
    net = LGMobileNetV2().eval()
    x = torch.randn(3, 3, 150, 150)
    with torch.no_grad():
        feats = net.features(x)
        ours = net.pool(feats).flatten(1)
        seeds = nn.AvgPool2d(kernel_size=3)(feats).flatten(1)
        torch.testing.assert_close(ours, seeds, rtol=0, atol=1e-6)
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 2)
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_non_default_class_count():
    net = LGMobileNetV2(num_classes=5).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 150, 150)).shape == (2, 5)


def test_seeded_network_matches_its_stored_expected_output():
    """Logits and per-block statistics equal the expect file (tests/model/expect_network.py)."""
    import json

    from expect_network import EXPECT, observe

    expected = json.loads(EXPECT.read_text())
    got = observe()
    torch.testing.assert_close(
        torch.tensor(got["logits"]), torch.tensor(expected["logits"]), rtol=1e-4, atol=1e-6
    )
    for name, (mean, std) in expected["blocks"].items():
        assert got["blocks"][name][0] == pytest.approx(mean, rel=1e-4, abs=1e-6), name
        assert got["blocks"][name][1] == pytest.approx(std, rel=1e-4, abs=1e-6), name


def test_torchvision_alternative_is_built_by_name_without_download():
    net = build_model("torchvision_mobilenet_v2", num_classes=2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 150, 150)).shape == (1, 2)


def test_unknown_architecture_and_bad_stride_are_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*lg_mobilenet_v2"):
        build_model("resnet")
    from model.network import ConvBNReLU

    with pytest.raises(ValueError, match="stride should be 1 or 2 instead of 3"):
        ConvBNReLU(3, 8, 3, stride=3)
