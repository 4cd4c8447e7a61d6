"""Occlusion equals Captum's Occlusion (plain batching and incremental re-inference), several geometries."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from tasks.attribution.occlusion import occlusion, plan_incremental, window_starts

warnings.filterwarnings("ignore", module="captum")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, padding=1))
            self.a = nn.Conv2d(8, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)
            self.head = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

        def forward(self, x):
            x = self.stem(x)
            x = self.relu(x + self.b(self.relu(self.a(x))))  # residual block
            return self.head(x)

    m = Net().eval()
    with torch.no_grad():
        m.stem[1].running_mean.uniform_(-0.2, 0.2)
        m.stem[1].running_var.uniform_(0.5, 2.0)
    return m


def captum_occ(model, x, t, w, s, bl):
    from captum.attr import Occlusion

    return Occlusion(model).attribute(x, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=bl, target=t,
                                      perturbations_per_eval=32)


def close(a: torch.Tensor, ref: torch.Tensor) -> None:
    assert a.shape == ref.shape and a.dtype == torch.float32
    err = float((a - ref).abs().max())
    assert err <= 1e-4, err
    assert err <= 1e-4 * max(float(ref.abs().max()), 1e-12) * 10, (err, float(ref.abs().max()))
    assert float(ref.abs().max()) > 0  # the comparison is not vacuous


@pytest.mark.parametrize("size,w,s,bl,bs", [(32, 8, 4, 0.0, 7), (37, 6, 5, 0.5, 13), (32, 9, 9, -1.0, 64),
                                            (40, 16, 3, 0.25, 50)])
@pytest.mark.parametrize("mode", [False, "force"])
def test_small_cnn_matches_captum(size, w, s, bl, bs, mode):
    m = small_cnn()
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size + 3)
    t = torch.tensor([0, 3, 4])
    ref = captum_occ(m, x, t, w, s, bl)
    close(occlusion(m, x, t, w, s, bl, batch_size=bs, incremental=mode), ref)


def test_tensor_baseline_matches_captum():
    m = small_cnn()
    x = torch.randn(2, 3, 32, 32)
    bl = torch.randn(1, 3, 32, 32)
    t = torch.tensor([1, 2])
    close(occlusion(m, x, t, 8, 4, bl, batch_size=11, incremental="force"), captum_occ(m, x, t, 8, 4, bl))


@pytest.mark.parametrize("arch,w,s,bl", [("alexnet", 16, 8, 0.3), ("resnet18", 12, 10, -0.5)])
def test_torchvision_models_match_captum(arch, w, s, bl):
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64) * 3
    t = torch.tensor([7])
    ref = captum_occ(m, x, t, w, s, bl)
    close(occlusion(m, x, t, w, s, bl, batch_size=24, incremental="force"), ref)
    close(occlusion(m, x, t, w, s, bl, batch_size=24, incremental=False), ref)


def test_plan_cuts_early_blocks_at_224():
    torch.manual_seed(0)
    m = torchvision.models.alexnet(weights=None).eval()
    plan = plan_incremental(m, (3, 224, 224), 16, 8)
    assert plan is not None and plan.est_speedup > 1.2
    # the cut is inside `features` (early conv blocks), and the geometry is AlexNet's: stride 4 * 2 = 8 after pool1
    assert plan.cut.startswith("features_")
    assert plan.geom[0][0] in (8, 16)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(plan.rest(plan.prefix(x)), m(x), atol=1e-5)


def test_window_positions_follow_captum():
    assert window_starts(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert window_starts(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (9, 11)]


def test_bad_geometry_raises():
    m = small_cnn()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="stride"):
        occlusion(m, x, torch.tensor([0]), window=4, stride=5)
    with pytest.raises(ValueError, match="larger than the image"):
        occlusion(m, x, torch.tensor([0]), window=32, stride=8)
    with pytest.raises(ValueError, match="target"):
        occlusion(m, x, torch.tensor([0, 1]), window=4, stride=2)
