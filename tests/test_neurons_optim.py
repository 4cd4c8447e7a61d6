"""Optimisation techniques on tiny models, small images, few steps (CPU; GPU when present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasks.neurons.common import Normalised
from tests.neurons_helpers import Tiny


def small_convnet(seed: int = 0) -> Normalised:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return Normalised(m, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def image(seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_class_viz_raises_target_score_by_a_large_factor():
    from tasks.neurons.class_viz import ClassVizConfig, class_visualisation

    m = Tiny().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    cfg = ClassVizConfig(size=32, steps=30, lr=0.05, l2=1e-4, jitter=2, blur_every=10, blur_sigma=0.5,
                         clip_value_pct=5, clip_grad_pct=5, param="pixel")  # the seeds' method
    img, hist = class_visualisation(m, 0, (0, 0, 0), (1, 1, 1), cfg)
    start, end = hist["score"].iloc[0], hist["score"].iloc[-1]
    assert 0.05 < start < 0.07  # zero image: the biases only
    assert end > 10 * start
    assert img.shape == (3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1
    # the class is "red": the optimised image is redder than it is green or blue
    assert float(img[0].mean()) > float(img[1].mean()) and float(img[0].mean()) > float(img[2].mean())
    noise_img, noise_hist = class_visualisation(m, 0, (0, 0, 0), (1, 1, 1),
                                                ClassVizConfig(size=32, steps=10, init="noise", param="pixel"))
    assert noise_hist["score"].iloc[-1] > noise_hist["score"].iloc[0]


def test_fourier_image_is_a_valid_decorrelated_image_with_a_1_over_f_spectrum():
    from tasks.neurons.param import COLOR_CORRELATION_SVD_SQRT, FourierImage, TransformConfig, random_transform, rfft2d_freqs

    assert rfft2d_freqs(6, 7).shape == (6, 4) and rfft2d_freqs(6, 8)[0, 0] == 0 and rfft2d_freqs(8, 8)[4, 4] == np.sqrt(0.5)
    img = FourierImage(20, 24, batch=2, generator=torch.Generator().manual_seed(0))
    x = img()
    assert x.shape == (2, 3, 20, 24) and float(x.detach().min()) > 0 and float(x.detach().max()) < 1
    assert abs(float(x.detach().mean()) - 0.5) < 0.02  # starts as near-uniform grey
    # a unit impulse at a frequency f shows up with amplitude ~ 1/f: low frequencies get the larger steps
    assert img.scale[0, 0, 1, 0, 0] > 4 * img.scale[0, 0, 8, 0, 0]
    assert img.scale[0, 0, 0, 0, 0] == pytest.approx(24.0)  # DC capped at 1 / (1 / max side)
    # the colour matrix mixes channels (ImageNet's colour correlation): one decorrelated channel -> all of R, G, B
    assert (COLOR_CORRELATION_SVD_SQRT[:, 0] > 0.2).all()
    y = random_transform(x, TransformConfig(pad=4, jitter=2, scale_range=(0.9, 1.1), degrees=10, jitter_after=1),
                         torch.Generator().manual_seed(1))
    assert y.shape[:2] == (2, 3) and abs(y.shape[-1] - 29) <= 4 and float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    y.sum().backward()
    assert img.spectrum.grad is not None and float(img.spectrum.grad.abs().sum()) > 0


def test_class_viz_is_recognised_after_small_transforms_and_is_not_noise():
    """The embedded MobileNetV2 (offline), 128 px, 100 steps: the picture of a class stays its top-1 under 8
    random small shifts / zooms / rotations and keeps most of its power at low frequencies. The seeds' pixel
    method (the code before the Fourier parameterisation) leaves ~60 % of the power above 0.25 cycles/px."""
    from tasks.core.models import load_model
    from tasks.neurons.class_viz import ClassVizConfig, class_visualisation, robust_top1
    from tasks.neurons.param import high_frequency_share

    lm = load_model("mobilenet_v2", "imagenet")
    m = lm.module.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    mean, std = lm.preprocess.mean, lm.preprocess.std
    cfg = ClassVizConfig(size=128, steps=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine OpenMP spin-waits make 2 threads many times slower
    try:
        for target in (1, 130):  # goldfish, flamingo
            img, hist = class_visualisation(m, target, mean, std, cfg)
            r = robust_top1(m, img, target, mean, std, n=8)
            assert r["top1"] and r["hits"] == 8, (lm.categories[target], r)
            assert high_frequency_share(img) < 0.3, lm.categories[target]
            assert hist["score"].iloc[-1] > hist["score"].iloc[0] + 20 and hist["prob"].iloc[-1] > 0.9
    finally:
        torch.set_num_threads(threads)


def test_channel_visualisation_excites_the_channel():
    from tasks.neurons.class_viz import ClassVizConfig, channel_visualisation

    m = Tiny().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    # normalised grey = 0: the red detector (R - G - B + 0.01) is alive at the grey start image
    img, hist = channel_visualisation(m, "features.3", 0, (0.5,) * 3, (0.5,) * 3, ClassVizConfig(size=32, steps=40, lr=0.1))
    assert hist["score"].iloc[-1] > 5 * max(hist["score"].iloc[0], 1e-3)
    r, g, b = (float(c.mean()) for c in img)
    assert img.shape == (3, 32, 32) and r > g + 0.05 and r > b + 0.05  # channel 0 is the red detector
    with pytest.raises(ValueError, match="out of range"):
        channel_visualisation(m, "features.3", 9, (0, 0, 0), (1, 1, 1), ClassVizConfig(size=32, steps=1))


def test_channel_viz_sits_beside_its_max_activating_patches_in_the_report(tmp_path):
    from reports.render import build_report, render_html
    from storage.paths import Store
    from tasks.extract.features import ExtractConfig, run_extraction
    from tasks.neurons.class_viz import ClassVizConfig, run_channel_viz
    from tasks.neurons.common import Source
    from tasks.neurons.max_activations import run_max_activations
    from tests.neurons_helpers import PRE64, make_square_dataset, tiny_lm

    make_square_dataset(tmp_path / "data", per_class=2)
    store = tmp_path / "store"
    lm = tiny_lm()
    fm = run_extraction(ExtractConfig(data=str(tmp_path / "data"), store=str(store), model="tiny", weights="none",
                                      progress=False, num_workers=0), lm=lm)
    src = Source(lm, PRE64, fm["artefact_id"], Store(store).artefact_dir("features", fm["artefact_id"]), fm)
    mx = run_max_activations(store, layer="features.3", k=2, channels=[0, 1], source=src)
    cv = run_channel_viz(store, cfg=ClassVizConfig(size=32, steps=5), source=src)  # channels from the max-act artefact
    assert cv["layer"] == "features.3" and [c["channel"] for c in cv["channels"]] == [0, 1]
    assert {"channel-0.png", "channel-1.png", "channel_viz.parquet"} <= {f["name"] for f in cv["files"]}
    ctx = build_report(store, fm["artefact_id"])
    card = next(c for c in ctx["neuron_cards"] if c["technique"] == "max_activations")
    rows = next(b for b in card["blocks"] if b["type"] == "channels")["rows"]
    assert [r["channel"] for r in rows] == [0, 1] and all(r["viz"].startswith("data:image/png;base64,") for r in rows)
    html = render_html(ctx)
    assert html.count('class="chviz"') == 2 and mx["artefact_id"] in html


def test_inversion_lowers_feature_distance_monotonically_on_average():
    from tasks.neurons.inversion import InversionConfig, invert_features

    net = small_convnet()
    rec, hist = invert_features(net, image(), "4", InversionConfig(steps=60, lr=0.05, tv_weight=1e-3))
    d = hist["feature_distance"].to_numpy()
    blocks = d[: 60].reshape(6, 10).mean(axis=1)
    assert np.all(np.diff(blocks) <= 1e-6), blocks
    assert d[-1] < 0.5 * d[0]
    assert rec.shape == (3, 32, 32)


def test_style_transfer_lowers_gram_loss():
    from tasks.neurons.style import StyleConfig, gram, style_transfer

    f = torch.arange(12.0).reshape(1, 3, 2, 2)
    assert torch.allclose(gram(f)[0], (f.reshape(3, 4) @ f.reshape(3, 4).t()) / 12)
    net = small_convnet()
    content, style = image(1), image(7)
    for opt in ("lbfgs", "adam"):
        cfg = StyleConfig(content_layer="2", style_layers=("0", "2", "4"), steps=8 if opt == "lbfgs" else 25,
                          optimizer=opt, lr=0.05, style_weight=10.0)
        out, hist = style_transfer(net, content, style, cfg)
        assert hist["style"].iloc[-1] < 0.5 * hist["style"].iloc[0], (opt, hist)
        assert out.shape == (3, 32, 32)


class Linear2(nn.Module):
    """logits = W x + b on a flattened (3, 8, 8) image, 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(192, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randint(0, 2, (2, 192), generator=g).float() - 0.5)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_fgsm_flips_with_eps_below_hand_bound():
    from tasks.neurons.adversarial import AdvConfig, fgsm, min_flip_eps

    m = Linear2().eval()
    net = Normalised(m, (0, 0, 0), (1, 1, 1))
    x = torch.full((1, 3, 8, 8), 0.5)
    v = (m.fc.weight[0] - m.fc.weight[1]).detach()
    with torch.no_grad():
        m.fc.bias[0] = 0.3 - float(v @ x.flatten())  # margin of class 0 over class 1 is exactly 0.3
    # linear model: FGSM lowers the margin by eps * ||w0 - w1||_1, so it flips exactly above this eps
    bound = 0.3 / float(v.abs().sum())
    assert net(x).argmax(1).item() == 0
    r = min_flip_eps(net, x, AdvConfig(method="fgsm", eps_min=0.1 / 255, eps_max=16 / 255, grid=12, refine=8))
    assert r["flipped"] and r["adv_pred"] == 1
    assert bound <= r["eps"] <= bound * 1.1
    assert r["linf"] == pytest.approx(r["eps"], rel=1e-5)
    cls = torch.tensor([0])
    assert net(fgsm(net, x, bound * 0.95, cls)).argmax(1).item() == 0
    assert net(fgsm(net, x, bound * 1.05, cls)).argmax(1).item() == 1
    # targeted PGD toward class 1 gets there within the same budget
    rp = min_flip_eps(net, x, AdvConfig(method="pgd", eps_min=0.1 / 255, eps_max=16 / 255, grid=12, steps=5), target=1)
    assert rp["flipped"] and rp["adv_pred"] == 1 and rp["eps"] <= 2 * bound + 1e-9


def test_deepdream_raises_objective():
    from tasks.neurons.deepdream import DreamConfig, deepdream

    net = small_convnet()
    out, hist = deepdream(net, image(size=48), "3", DreamConfig(octaves=2, steps_per_octave=5, lr=0.02, jitter=2))
    assert hist["objective"].iloc[-1] > 1.5 * hist["objective"].iloc[0]
    assert out.shape == (3, 48, 48)
