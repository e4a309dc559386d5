"""The seed network's stored expected output, in the manner of torchvision's expect files.

A seeded ``LGMobileNetV2`` in training mode (batch statistics, so every layer's wiring shows in
the numbers) applied to a seeded input: the logits and each block's output mean and standard
deviation are stored in ``expect/lg_mobilenet_v2_seed0.json``. A change to the architecture, the
block table, the activations, the residual rule or the initialisation moves them.

Regenerate only when the network changes on purpose:
``.venv/bin/python tests/model/expect_network.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EXPECT = Path(__file__).parent / "expect" / "lg_mobilenet_v2_seed0.json"
BLOCKS = ["stem", *(f"block{i}" for i in range(1, 9))]


def observe() -> dict:
    """Build the seeded network, run the seeded input, return what the expect file holds."""
    from model.network import LGMobileNetV2

    torch.manual_seed(0)
    net = LGMobileNetV2().train()
    x = torch.rand(4, 3, 150, 150, generator=torch.Generator().manual_seed(1))
    stats = {}
    with torch.no_grad():
        h = x
        for name in BLOCKS:
            h = getattr(net, name)(h)
            stats[name] = [h.mean().item(), h.std().item()]
        torch.manual_seed(0)
        net = LGMobileNetV2().train()
        logits = net(x)
    return {"logits": logits.tolist(), "blocks": stats}


if __name__ == "__main__":
    torch.set_num_threads(1)
    EXPECT.parent.mkdir(exist_ok=True)
    EXPECT.write_text(json.dumps(observe(), indent=1) + "\n")
    print(f"wrote {EXPECT}")
