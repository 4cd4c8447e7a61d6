"""Faithfulness curves and a hand-built model whose answer is known: one input region drives the logit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tasks.attribution import saliency as S
from tasks.attribution.cam import grad_cam
from tasks.attribution.faithfulness import auc, deletion_insertion
from tasks.attribution.occlusion import occlusion

warnings.filterwarnings("ignore", module="captum")

H = W = 32
REGION = (slice(8, 16), slice(18, 26))  # rows 8..15, cols 18..25 drive class 0


class Gate(nn.Module):
    """Multiplies by the REGION indicator (a module, so Grad-CAM can look at its output)."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 1, H, W)
        mask[:, :, REGION[0], REGION[1]] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


class RegionModel(nn.Module):
    """logit_0 = sum over REGION of relu(conv1x1(x)); logit_1 = small constant. Known answer: REGION."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        with torch.no_grad():
            self.conv.weight.fill_(0.5)
            self.conv.bias.fill_(0.1)
        self.gate = Gate()

    def forward(self, x):
        a = self.gate(self.relu(self.conv(x)))
        s = a.sum(dim=(1, 2, 3))
        return torch.stack([s * 0.004, torch.full_like(s, 0.5)], dim=1)


def argmax_pixel(m2d: torch.Tensor) -> tuple[int, int]:
    i = int(m2d.flatten().argmax())
    return i // W, i % W


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x = torch.rand(2, 3, H, W) * 0.2
    x[:, :, REGION[0], REGION[1]] += 1.0  # a bright object: blurring it (insertion start) weakens the logit
    return RegionModel().eval(), x, torch.tensor([0, 0])


@pytest.mark.parametrize("method", ["occlusion", "saliency", "guided", "deconvnet", "smoothgrad", "ig", "gradcam"])
def test_known_region_gets_maximal_attribution(setup, method):
    m, x, t = setup
    if method == "occlusion":
        a = occlusion(m, x, t, window=4, stride=2, incremental="force").mean(1)
    elif method == "saliency":
        a = S.vanilla_gradient(m, x, t, reduce="max")
    elif method == "guided":
        a = S.guided_backprop(m, x, t).abs().amax(1)
    elif method == "deconvnet":
        a = S.deconvnet(m, x, t).abs().amax(1)
    elif method == "smoothgrad":
        a = S.smoothgrad(m, x, t, stdevs=0.1, seed=0).amax(1)
    elif method == "ig":
        a = S.integrated_gradients(m, x, t).sum(1)
    else:
        a = grad_cam(m, x, t, "gate")  # the gated layer: Grad-CAM weights are global per channel
    for n in range(2):
        r, c = argmax_pixel(a[n])
        assert REGION[0].start <= r < REGION[0].stop and REGION[1].start <= c < REGION[1].stop, (method, r, c)
        inside = a[n][REGION].abs().min() if method != "occlusion" else a[n][10:14, 20:24].min()
        outside = a[n].clone()
        outside[REGION] = 0
        assert float(inside) > float(outside.abs().max()), method  # everything outside the region is weaker


def test_deletion_auc_perfect_below_random_and_insertion_above(setup):
    m, x, t = setup
    perfect = torch.zeros(2, H, W)
    perfect[:, REGION[0], REGION[1]] = 1.0 + torch.rand(2, 8, 8) * 0.01
    torch.manual_seed(1)
    rand = torch.rand(2, H, W)
    fp = deletion_insertion(m, x, t, perfect, n_steps=16, batch_size=10)
    fr = deletion_insertion(m, x, t, rand, n_steps=16, batch_size=7)
    assert fp.deletion.shape == (2, 17) and fp.fractions[0] == 0 and fp.fractions[-1] == 1
    assert (fp.deletion_auc < fr.deletion_auc - 0.1).all()
    assert (fp.insertion_auc > fr.insertion_auc + 0.05).all()
    # the curves start at the model's score on the intact (deletion) / blurred (insertion) image
    p0 = torch.softmax(m(x), 1)[:, 0]
    assert torch.allclose(fp.deletion[:, 0], p0, atol=1e-5)
    assert torch.allclose(fp.insertion[:, -1], p0, atol=1e-5)


def test_auc_trapezoid():
    assert torch.allclose(auc(torch.tensor([[0.0, 0.5, 1.0]])), torch.tensor([0.5]))
    assert torch.allclose(auc(torch.ones(3, 5)), torch.ones(3))
    with pytest.raises(ValueError):
        deletion_insertion(RegionModel(), torch.rand(1, 3, H, W), torch.tensor([0]), torch.rand(1, 8, 8))
