"""Grad-CAM equals pytorch-grad-cam's GradCAM (normalised maps), incl. a conv followed by an in-place ReLU."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from tasks.attribution.cam import default_cam_layer, grad_cam
from tasks.core.hooks import get_module


def reference(model, x, t, layer):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model, [get_module(model, layer)]) as cam:
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(i)) for i in t]))


def small_cnn(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(inplace=inplace),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()


def close(a, ref):
    assert a.shape == ref.shape
    assert float(ref.max()) > 0.99  # normalised, non-trivial map
    assert float((a - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer4"), ("resnet18", "layer3.1.conv2"),
                                        ("alexnet", "features.12")])
def test_matches_pytorch_grad_cam(arch, layer):
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(3, 3, 64, 72) if arch == "resnet18" else torch.randn(3, 3, 128, 136)  # AlexNet: 3x3 maps
    t = torch.tensor([3, 0, 9])
    close(grad_cam(m, x, t, layer, batch_size=2), reference(m, x, t, layer))


def test_small_cnn_and_default_layer():
    m = small_cnn(False)
    x = torch.randn(4, 3, 20, 24)
    t = torch.tensor([0, 1, 2, 3])
    assert default_cam_layer(m) == "3"
    close(grad_cam(m, x, t, batch_size=3), reference(m, x, t, "3"))


def test_conv_followed_by_inplace_relu():
    """The map of a conv layer is its own (pre-ReLU) activation x its gradient, whether or not the next ReLU
    works in place; it equals pytorch-grad-cam on the same network without in-place ReLUs. (pytorch-grad-cam
    on the in-place network reads the post-ReLU activation through the shared storage; documented.)"""
    inplace, plain = small_cnn(True), small_cnn(False)
    x = torch.randn(3, 3, 20, 20)
    t = torch.tensor([1, 4, 2])
    mine = grad_cam(inplace, x, t, "3")
    close(mine, reference(plain, x, t, "3"))
    close(mine, grad_cam(plain, x, t, "3"))
    # the forward of the in-place model is unchanged by the hook, and the hook is gone afterwards
    assert all(not mod._forward_hooks for mod in inplace.modules())
    with torch.no_grad():
        assert torch.allclose(inplace(x), plain(x))


def test_raw_map_and_errors():
    m = small_cnn(False)
    x = torch.randn(2, 3, 16, 16)
    raw = grad_cam(m, x, torch.tensor([0, 1]), "3", normalise=False)
    assert raw.shape == (2, 16, 16) and float(raw.min()) >= 0
    with pytest.raises(ValueError, match="unknown layer"):
        grad_cam(m, x, torch.tensor([0, 1]), "nope")
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        grad_cam(m, x, torch.tensor([0, 1]), "7")


def test_memory_does_not_grow_across_batches():
    m = small_cnn(True)
    x = torch.randn(16, 3, 16, 16)
    t = torch.zeros(16, dtype=torch.long)
    import gc
    import weakref

    refs = []
    orig = torch.autograd.grad

    def spy(outputs, inputs, *a, **k):
        refs.append(weakref.ref(inputs))
        return orig(outputs, inputs, *a, **k)

    torch.autograd.grad = spy
    try:
        grad_cam(m, x, t, "3", batch_size=4)
    finally:
        torch.autograd.grad = orig
    gc.collect()
    assert len(refs) == 4 and all(r() is None for r in refs)  # no activation outlives its batch
