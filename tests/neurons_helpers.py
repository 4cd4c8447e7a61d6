"""Hand-built models and datasets for the neuron tests (imported by tests/test_neurons_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.core.models import LoadedModel, Preprocess

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
PRE64 = Preprocess(resize=64, crop=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class Tiny(nn.Module):
    """features: conv1(3->4, 3x3, pad 1) - ReLU - maxpool 2 - conv2(4->4, 3x3, pad 1) - ReLU; head: avg -> Linear(4, 3).

    Channel 0 of conv1 is a red detector (R - G - B at the centre tap); channel 0 of conv2 averages it over 3x3,
    so its maximum sits at the centre of a red square. The head scores class 0 ("red") by that channel.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            c1, c2 = self.features[0], self.features[3]
            c1.weight.mul_(0.1)
            c1.weight[0] = 0
            c1.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
            c1.bias[0] = 0.01  # alive at a black image (class visualisation starts there)
            c2.weight.mul_(0.1)
            c2.weight[0] = 0
            c2.weight[0, 0] = 1 / 9
            c2.bias[0] = 0
            self.fc.weight.zero_()
            self.fc.weight[0, 0] = 1.0
            self.fc.weight[1, 1] = 1.0
            self.fc.weight[2, 2] = 1.0
            self.fc.bias.copy_(torch.tensor([0.05, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_lm() -> LoadedModel:
    m = Tiny().eval()
    return LoadedModel(m, {"source": "test", "arch": "tiny", "weights": "hand", "weights_sha256": None}, PRE64,
                       ["red", "green", "blue"], sum(p.numel() for p in m.parameters()))


def make_square_dataset(root: Path, per_class: int = 4, size: int = 64, square: int = 6, seed: int = 0) -> dict[str, tuple[int, int]]:
    """``root/<colour>/<i>.png``: grey noisy background with one coloured ``square`` at an even (y, x).

    Returns ``path (relative) -> (y, x)`` of each square's top-left corner.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    where = {}
    for name, rgb in COLORS.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(128 + rng.integers(-12, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            y, x = (int(v) * 2 for v in rng.integers(2, (size - square) // 2 - 2, 2))
            arr[y:y + square, x:x + square] = rgb
            Image.fromarray(arr).save(d / f"{name}_{i}.png")
            where[f"{name}/{name}_{i}.png"] = (y, x)
    return where
