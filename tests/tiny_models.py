"""Tiny hand-built models importable as ``tiny_models:build`` (a team's own factory, in tests)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv(x))).flatten(1)
        return self.fc(torch.relu(self.fc1(x)))


def build() -> nn.Module:
    return TinyNet()


def not_a_model():
    return 42


class TinyFeatures(nn.Module):
    """TinyNet's penultimate features (input of ``fc``) as a model: what a team would TorchScript."""

    def __init__(self, net: TinyNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        return torch.relu(n.fc1(n.pool(n.relu(n.conv(x))).flatten(1)))


def extract_config(data, store, **kw):
    """The ``ExtractConfig`` the extract tests use: ``tiny_models:build`` (unless ``model`` is given), random
    weights, no progress bar, decode in-process (``num_workers=0``); ``kw`` overrides any of them."""
    from tasks.extract.features import ExtractConfig

    kw.setdefault("model", "tiny_models:build")
    kw.setdefault("weights", "none")
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    return ExtractConfig(data=str(data), store=str(store), **kw)
