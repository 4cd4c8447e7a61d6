"""Gradient methods equal their Captum counterparts; backprop rules; saliency -> mask."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tasks.attribution import saliency as S
from tasks.attribution.masks import saliency_to_mask

warnings.filterwarnings("ignore", module="captum")
warnings.filterwarnings("ignore", message=".*backward hook.*")


def small_cnn(inplace: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(inplace=inplace),
                         nn.Linear(16, 5)).eval()


MODELS = {
    "small": lambda: small_cnn(True),
    "alexnet": lambda: torchvision.models.alexnet(weights=None).eval(),
    "resnet18": lambda: torchvision.models.resnet18(weights=None).eval(),
}


def close(a: torch.Tensor, ref: torch.Tensor) -> None:
    assert a.shape == ref.shape and a.dtype == torch.float32
    scale = float(ref.abs().max())
    assert scale > 0
    err = float((a - ref).abs().max())
    assert err <= 1e-4 and err <= 1e-4 * scale, (err, scale)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    torch.manual_seed(0)
    m = MODELS[request.param]()
    size = 32 if request.param == "small" else 64
    n = 3 if request.param == "small" else 2
    x = torch.randn(n, 3, size, size) * 2
    return m, x, torch.tensor([1, 4, 2][:n])


def test_saliency(case):
    from captum.attr import Saliency

    m, x, t = case
    close(S.vanilla_gradient(m, x, t, batch_size=2), Saliency(m).attribute(x, target=t))
    close(S.vanilla_gradient(m, x, t, abs=False), Saliency(m).attribute(x, target=t, abs=False))
    simonyan = S.vanilla_gradient(m, x, t, reduce="max")
    assert simonyan.shape == (x.shape[0], x.shape[2], x.shape[3])
    close(simonyan, Saliency(m).attribute(x, target=t).amax(dim=1))


def test_guided_and_deconvnet(case):
    from captum.attr import Deconvolution, GuidedBackprop

    m, x, t = case
    g = S.guided_backprop(m, x, t, batch_size=2)
    d = S.deconvnet(m, x, t, batch_size=2)
    close(g, GuidedBackprop(m).attribute(x, target=t))
    close(d, Deconvolution(m).attribute(x, target=t))
    assert not torch.allclose(g, d)  # the two rules differ
    # the rules are gone afterwards: plain gradients are back
    from captum.attr import Saliency

    close(S.vanilla_gradient(m, x, t, abs=False), Saliency(m).attribute(x, target=t, abs=False))
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_smoothgrad_same_noise_as_captum(case):
    from captum.attr import NoiseTunnel, Saliency

    m, x, t = case
    torch.manual_seed(7)
    ref = NoiseTunnel(Saliency(m)).attribute(x, nt_type="smoothgrad", target=t)
    torch.manual_seed(7)
    close(S.smoothgrad(m, x, t, batch_size=3), ref)
    a = S.smoothgrad(m, x, t, seed=3, nt_samples=3, stdevs=0.5)
    b = S.smoothgrad(m, x, t, seed=3, nt_samples=3, stdevs=0.5)
    assert torch.equal(a, b)


def test_integrated_gradients(case):
    from captum.attr import IntegratedGradients

    m, x, t = case
    steps = 50 if x.shape[2] == 32 else 16  # Captum's default 50 on the small CNN; fewer on the big ones (speed)
    close(S.integrated_gradients(m, x, t, n_steps=steps, batch_size=14),
          IntegratedGradients(m).attribute(x, target=t, n_steps=steps))
    close(S.integrated_gradients(m, x, t, baselines=0.5, n_steps=7, method="riemann_middle", batch_size=5),
          IntegratedGradients(m).attribute(x, baselines=0.5, target=t, n_steps=7, method="riemann_middle"))


def test_inplace_relu_model_same_as_not_inplace():
    a, b = small_cnn(True), small_cnn(False)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0, 3])
    for fn in (S.guided_backprop, S.deconvnet, S.vanilla_gradient):
        assert torch.allclose(fn(a, x, t), fn(b, x, t), atol=1e-6)


def test_bad_inputs():
    m = small_cnn()
    with pytest.raises(ValueError, match="N, C, H, W"):
        S.vanilla_gradient(m, torch.randn(3, 32, 32), torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        S.vanilla_gradient(m, torch.randn(2, 3, 32, 32), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="method"):
        S.integrated_gradients(m, torch.randn(1, 3, 32, 32), torch.tensor([0]), method="simpson")


def test_saliency_to_mask_threshold_and_grabcut():
    sal = np.zeros((40, 40), np.float32)
    sal[10:25, 12:30] = 1.0
    sal += np.random.default_rng(0).random(sal.shape).astype(np.float32) * 0.1
    m = saliency_to_mask(sal, percentile=80)
    assert m.dtype == bool and abs(m.mean() - 0.2) < 0.02 and m[10:25, 12:30].mean() > 0.95
    img = np.full((40, 40, 3), 30, np.uint8)
    img[10:25, 12:30] = (220, 40, 40)  # the salient object has its own colour
    g = saliency_to_mask(sal, "grabcut", image=img)
    inside = g[10:25, 12:30].mean()
    outside = (g.sum() - g[10:25, 12:30].sum()) / (g.size - 15 * 18)
    assert inside > 0.9 and outside < 0.05
    with pytest.raises(ValueError, match="image"):
        saliency_to_mask(sal, "grabcut")


def test_rules_also_apply_to_relu6():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU6(inplace=True), nn.Conv2d(6, 6, 3, padding=1),
                      nn.ReLU6(), nn.Flatten(), nn.Linear(6 * 8 * 8, 3)).eval()
    x = torch.randn(2, 3, 8, 8) * 3
    t = torch.tensor([0, 2])
    plain = S.vanilla_gradient(m, x, t, abs=False)
    g, d = S.guided_backprop(m, x, t), S.deconvnet(m, x, t)
    assert not torch.allclose(g, plain) and not torch.allclose(d, plain) and not torch.allclose(g, d)
