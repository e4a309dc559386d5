"""The classifiers: the seed's LGMobileNetV2 and torchvision's MobileNetV2.

LGMobileNetV2 follows the exercise notebook in ``shared/seed`` with its blanks filled and its
bugs fixed, and otherwise the MobileNetV2 paper (arXiv 1801.04381):

* every layer of an inverted-residual block is fed the previous layer's output;
* ReLU6 after the expansion and depthwise convolutions, a linear (no activation) projection;
* the residual connection only where stride is 1 and the block keeps its channel count;
* expansion 1 in the first block, 6 after;
* ``forward`` pools before the classifier.

The seed's module names (``stem``, ``block1``..``block8``, ``pool``, ``classifier`` and, inside
a block, ``expand_pw``, ``depthwise``, ``squeeze_pw``, each with ``conv``/``bn``/``act``) are
kept so that a state_dict trained with the notebook's classes loads unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# One row per block, as in the seed's comments for a 3x150x150 input:
# t: expansion, c: output channels, s: stride            output at 150x150
LG_BLOCKS: tuple[tuple[int, int, int], ...] = (
    # t, c, s
    (1, 16, 1),  # block1  16 x 75 x 75
    (6, 32, 2),  # block2  32 x 38 x 38
    (6, 64, 2),  # block3  64 x 19 x 19
    (6, 64, 1),  # block4  64 x 19 x 19
    (6, 128, 2),  # block5 128 x 10 x 10
    (6, 128, 2),  # block6 128 x  5 x  5
    (6, 128, 1),  # block7 128 x  5 x  5
    (6, 128, 2),  # block8 128 x  3 x  3
)
STEM_CHANNELS = 16


class ConvBNReLU(nn.Module):
    """Convolution, batch norm and ReLU6 (or no activation for a linear projection)."""

    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            inplanes, outplanes, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(outplanes)
        self.act = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """Expand (1x1), filter (3x3 depthwise), project (1x1, linear); residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if expand_ratio < 1:
            raise ValueError(f"expand_ratio should be at least 1 instead of {expand_ratio}")
        hidden_dim = round(inp * expand_ratio)
        self.shortcut = stride == 1 and inp == oup
        self.expand_pw = ConvBNReLU(inp, hidden_dim, kernel_size=1)  # pw
        self.depthwise = ConvBNReLU(
            hidden_dim, hidden_dim, kernel_size=3, stride=stride, groups=hidden_dim
        )  # dw
        self.squeeze_pw = ConvBNReLU(hidden_dim, oup, kernel_size=1, activation=False)  # pw-linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.squeeze_pw(self.depthwise(self.expand_pw(x)))
        return x + out if self.shortcut else out


class LGMobileNetV2(nn.Module):
    """The seed's small MobileNetV2: 3x150x150 in, ``num_classes`` logits out."""

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 3,
        blocks: tuple[tuple[int, int, int], ...] = LG_BLOCKS,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes should be at least 1 instead of {num_classes}")
        self.stem = ConvBNReLU(in_channels, STEM_CHANNELS, kernel_size=3, stride=2)
        inp = STEM_CHANNELS
        for index, (t, c, s) in enumerate(blocks, start=1):
            self.add_module(f"block{index}", InvertedResidual(inp, c, s, t))
            inp = c
        self.num_blocks = len(blocks)
        # The seed pools with AvgPool2d(3) over the 3x3 map a 150x150 input gives; adaptive
        # pooling is the same there and still yields one vector at other input sizes.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(inp, num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{index}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(x.flatten(1))


def _init_weights(module: nn.Module) -> None:
    # The initialisation torchvision uses for MobileNetV2.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _torchvision_mobilenet_v2(num_classes: int = 2, width_mult: float = 1.0) -> nn.Module:
    from torchvision.models import mobilenet_v2

    # weights=None: never downloads; the checkpoint provides the weights.
    return mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lg_mobilenet_v2": LGMobileNetV2,
    "torchvision_mobilenet_v2": _torchvision_mobilenet_v2,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build an architecture by its registered name with the given arguments."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {name!r}; known architectures: {known}") from None
    return factory(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
