"""Occlusion equals Captum's Occlusion on both paths (incremental re-inference and plain batching), on tiny
nets with every block type of AlexNet / ResNet / MobileNetV2 and on the torchvision architectures themselves;
the incremental path is really taken where it should be (asserted on the plan and the returned ``info``)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torchvision
from torch import nn

from tasks.attribution import occlusion as occ_mod
from tasks.attribution.occlusion import inference_copy, occlusion, plan_incremental, window_starts

warnings.filterwarnings("ignore", module="captum")


def _randomise_bn(m: torch.nn.Module, seed: int = 0, size: int = 64) -> torch.nn.Module:
    """Seeded random BatchNorm affine terms, and running statistics calibrated on random images (one
    train-mode forward with cumulative averaging). Without this, random-init MobileNetV2's activations vanish
    block by block (logits ~1e-10, occlusion maps ~1e-11) and an equality check would compare near-zeros.
    Returns ``m`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
            b.weight.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.bias.copy_(torch.rand(b.num_features, generator=g) * 0.4 - 0.2)
        if bns:
            m.train()
            m(torch.randn(4, 3, size, size, generator=g))
    return m.eval()


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

    return _randomise_bn(Net())


class TinyAlexNet(nn.Module):
    """AlexNet's block types: 11x11 stride-4 conv, ReLU, overlapping max-pools, Dropout, a Linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 12, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Linear(32, 7))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TinyResNet(nn.Module):
    """ResNet's block types: 7x7 stride-2 stem + BN + 3x3 stride-2 max-pool, basic blocks with residual add
    (``out += identity``), a stride-2 block with a 1x1 downsample, global average pool, Linear."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else None)

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu(out)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(self.Block(8, 8, 1), self.Block(8, 8, 1))
        self.layer2 = nn.Sequential(self.Block(8, 16, 2), self.Block(16, 16, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyMobileNet(nn.Module):
    """MobileNetV2's block types: Conv+BN+ReLU6, inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear
    projection, residual add), a stride-2 depthwise block, and a concat / avg-pool / dilated side branch."""

    @staticmethod
    def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, dil: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, dil * (k - 1) // 2, dilation=dil, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 3):
            super().__init__()
            hid = cin * expand
            cbr = TinyMobileNet.cbr
            self.conv = nn.Sequential(cbr(cin, hid, 1), cbr(hid, hid, 3, stride, groups=hid),
                                      nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    def __init__(self):
        super().__init__()
        self.stem = self.cbr(3, 8, 3, 2)
        self.b1 = self.Inverted(8, 8, 1)
        self.b2 = self.Inverted(8, 12, 2)
        self.b3 = self.Inverted(12, 12, 1)
        self.side = nn.Sequential(self.cbr(12, 4, 3, dil=2), nn.AvgPool2d(3, 1, 1))
        self.head = nn.Sequential(self.cbr(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(24, 7))

    def forward(self, x):
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.head(torch.cat([x, self.side(x)], dim=1))


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn({"alexnet": TinyAlexNet, "resnet": TinyResNet, "mobilenet": TinyMobileNet}[arch]())


def torchvision_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(getattr(torchvision.models, arch)(weights=None))


def captum_occ(model, x, t, w, s, bl):
    from captum.attr import Occlusion

    return Occlusion(model).attribute(x, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=bl, target=t,
                                      perturbations_per_eval=64)


def close(a: torch.Tensor, ref: torch.Tensor) -> None:
    """The documented tolerance: 1e-4 absolute and 1e-3 relative to the largest attribution (Conv+BN folding
    and other kernels change float32 rounding, ~1e-6 relative)."""
    assert a.shape == ref.shape and a.dtype == torch.float32
    err = float((a - ref).abs().max())
    assert err <= 1e-4, err
    assert err <= 1e-3 * float(ref.abs().max()), (err, float(ref.abs().max()))
    assert float(ref.abs().max()) > 1e-6  # the comparison is not vacuous


@pytest.mark.parametrize("size,w,s,bl,bs", [(32, 8, 4, 0.0, 7), (37, 6, 5, 0.5, 13), (32, 9, 9, -1.0, 64),
                                            (40, 16, 3, 0.25, 50)])
@pytest.mark.parametrize("mode", [False, "force"])
def test_small_cnn_matches_captum(size, w, s, bl, bs, mode):
    m = small_cnn()
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size + 3)
    t = torch.tensor([0, 3, 4])
    ref = captum_occ(m, x, t, w, s, bl)
    info: dict = {}
    close(occlusion(m, x, t, w, s, bl, batch_size=bs, incremental=mode, info=info), ref)
    assert info["path"] == ("incremental" if mode else "batched")


@pytest.mark.parametrize("arch,size,w,s", [("alexnet", 80, 16, 8), ("alexnet", 67, 12, 7), ("resnet", 48, 8, 4),
                                           ("resnet", 53, 10, 6), ("mobilenet", 40, 8, 4), ("mobilenet", 45, 7, 5)])
@pytest.mark.parametrize("mode", ["force", False])
def test_tiny_architectures_match_captum_on_both_paths(arch, size, w, s, mode):
    m = tiny(arch)
    torch.manual_seed(2)
    x = torch.randn(2, 3, size, size + 2)
    t = torch.tensor([1, 6])
    info: dict = {}
    a = occlusion(m, x, t, w, s, 0.1, batch_size=17, incremental=mode, info=info)
    close(a, captum_occ(m, x, t, w, s, 0.1))
    if mode:
        assert info["path"] == "incremental" and info["incremental_images"] == 2
        assert info["check_error"] <= 1e-4
    else:
        assert info["path"] == "batched"


def test_tiny_plans_put_the_early_blocks_on_patches():
    """The forced plan computes every block type on patches: convs (strided, depthwise, dilated), max / avg
    pools, ReLU / ReLU6, residual adds and the channel concat; the check against the full forward passes."""
    for arch, size, kinds in [("alexnet", 80, {"conv", "maxpool"}), ("resnet", 48, {"conv", "maxpool"}),
                              ("mobilenet", 40, {"conv", "avgpool"})]:
        m = tiny(arch)
        plan = plan_incremental(m, (3, size, size), 8, 4, min_gain=float("-inf"))
        assert plan is not None, arch
        assert plan.check_error <= plan.check_tol, arch
        assert kinds <= {op.kind for op in plan.ops.values()}, arch
        incs = plan.incremental_nodes
        if arch == "resnet":
            assert any(n.startswith("add") for n in incs)  # residual add on patches
        if arch == "mobilenet":
            assert "cat" in incs and any(n.startswith("add") for n in incs)
            target = {n.name: n.target for n in plan.module.graph.nodes}
            dw = [n for n in incs if plan.ops.get(n) and plan.ops[n].kind == "conv"
                  and plan.module.get_submodule(target[n]).groups > 1]
            assert dw, "depthwise convs run on patches"


@pytest.mark.parametrize("arch,w,s,bl", [("alexnet", 16, 8, 0.3), ("resnet18", 12, 10, -0.5),
                                         ("mobilenet_v2", 16, 12, 0.2)])
@pytest.mark.parametrize("mode", ["force", False])
def test_torchvision_models_match_captum(arch, w, s, bl, mode):
    m = torchvision_model(arch)
    x = torch.randn(1, 3, 64, 64) * 3
    t = torch.tensor([7])
    info: dict = {}
    close(occlusion(m, x, t, w, s, bl, batch_size=24, incremental=mode, info=info), captum_occ(m, x, t, w, s, bl))
    assert info["path"] == ("incremental" if mode else "batched")


@pytest.mark.parametrize("arch", ["alexnet", "resnet18", "mobilenet_v2"])
def test_auto_takes_the_incremental_path_at_224(arch):
    """At the audit's size the cost model picks a cut and the geometry check passes for every architecture
    (the code as found fell back to plain batching on ResNet-18: its input-crop scheme needed crops as large as
    the image). A coarse 32/32 grid keeps the Captum comparison short."""
    m = torchvision_model(arch)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 224, 224)
    t = torch.tensor([11])
    plan = plan_incremental(m, (3, 224, 224), 16, 8)
    assert plan is not None and plan.est_speedup > 1.3
    assert plan.check_error <= plan.check_tol
    info: dict = {}
    a = occlusion(m, x, t, 32, 32, 0.0, batch_size=64, info=info)
    assert info["path"] == "incremental" and info["cut"]
    close(a, captum_occ(m, x, t, 32, 32, 0.0))


def test_inference_copy_folds_batchnorm_and_keeps_the_model():
    m = torchvision_model("resnet18")
    x = torch.randn(2, 3, 64, 64)
    gm = inference_copy(m)
    assert isinstance(gm, torch.fx.GraphModule)
    assert not any(isinstance(b, nn.BatchNorm2d) for b in gm.modules())  # incl. the BNs inside BasicBlocks
    assert any(isinstance(b, nn.BatchNorm2d) for b in m.modules())  # the caller's model is untouched
    assert not any(getattr(b, "inplace", False) for b in gm.modules())
    with torch.no_grad():
        assert torch.allclose(gm(x), m(x), atol=1e-4, rtol=1e-4)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so occlusion uses extraction's prepared copy."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        if float(x.sum()) > 1e9:
            return self.body(x) * 2
        return self.body(x)


def test_untraceable_model_uses_plain_batching_and_matches_captum(caplog):
    torch.manual_seed(0)
    m = _randomise_bn(Untraceable())
    x = torch.randn(2, 3, 24, 24)
    t = torch.tensor([0, 3])
    info: dict = {}
    with caplog.at_level(logging.WARNING, logger="tasks.attribution.occlusion"):
        a = occlusion(m, x, t, 6, 3, 0.0, batch_size=10, incremental=True, info=info)
    assert info["path"] == "batched" and info["incremental_images"] == 0
    assert "no profitable incremental cut" in caplog.text
    close(a, captum_occ(m, x, t, 6, 3, 0.0))


@pytest.mark.parametrize("corrupt", ["short_region", "short_patch"])
def test_wrong_geometry_is_caught_by_the_check(corrupt, monkeypatch, caplog):
    """If the planner got an op's geometry wrong, the check against the full forward rejects the plan and
    occlusion still returns Captum's answer by plain batching. Simulated two ways: every changed region one
    row/column short (wrong values pasted: caught by the tolerance) and every patch one short (shapes no
    longer fit: caught as an error)."""
    m = tiny("resnet")
    if corrupt == "short_region":
        real_iv = occ_mod._interval_through
        monkeypatch.setattr(occ_mod, "_interval_through",
                            lambda iv, op, ax, L: [(a, max(a, b - 1)) for a, b in real_iv(iv, op, ax, L)])
        message = "differs from the full forward"
    else:
        real_axis = occ_mod._axis_of
        monkeypatch.setattr(occ_mod, "_axis_of",
                            lambda iv, L: occ_mod._Axis(L, max(1, real_axis(iv, L).P - 1), real_axis(iv, L).starts))
        message = "failed its check"
    x = torch.randn(1, 3, 48, 48)
    t = torch.tensor([2])
    with caplog.at_level(logging.WARNING, logger="tasks.attribution.occlusion"):
        assert plan_incremental(m, (3, 48, 48), 8, 4, min_gain=float("-inf")) is None
        info: dict = {}
        a = occlusion(m, x, t, 8, 4, 0.0, incremental="force", info=info)
    assert message in caplog.text
    assert info["path"] == "batched"
    close(a, captum_occ(m, x, t, 8, 4, 0.0))


def test_tensor_baseline_matches_captum():
    m = small_cnn()
    x = torch.randn(2, 3, 32, 32)
    bl = torch.randn(1, 3, 32, 32)
    t = torch.tensor([1, 2])
    close(occlusion(m, x, t, 8, 4, bl, batch_size=11, incremental="force"), captum_occ(m, x, t, 8, 4, bl))


def test_plan_is_reused_and_checked_for_its_shape(caplog):
    m = tiny("resnet")
    plan = plan_incremental(m, (3, 48, 48), 8, 4, min_gain=float("-inf"))
    x = torch.randn(1, 3, 40, 40)
    t = torch.tensor([3])
    with caplog.at_level(logging.WARNING, logger="tasks.attribution.occlusion"):
        a = occlusion(m, x, t, 8, 4, 0.0, incremental="force", plan=plan)
    assert "planning again" in caplog.text
    close(a, captum_occ(m, x, t, 8, 4, 0.0))


def test_plan_of_changed_weights_is_not_reused(caplog):
    """A plan holds a folded copy of the model; after the model's weights change in place (as an optimiser
    step or the sanity check's re-initialisation would), the stale plan is not used."""
    m = tiny("resnet")
    plan = plan_incremental(m, (3, 48, 48), 8, 4, min_gain=float("-inf"))
    with torch.no_grad():
        m.fc.weight.mul_(-3.0)
    x = torch.randn(1, 3, 48, 48)
    t = torch.tensor([4])
    with caplog.at_level(logging.WARNING, logger="tasks.attribution.occlusion"):
        a = occlusion(m, x, t, 8, 4, 0.0, incremental="force", plan=plan)
    assert "planning again" in caplog.text
    close(a, captum_occ(m, x, t, 8, 4, 0.0))


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


def test_gpu_batch_is_sized_from_free_memory_and_cpu_default_is_unchanged(monkeypatch):
    import tasks.attribution.occlusion as occ

    gib = 2**30
    # half the free memory at twice the measured per-copy peak, capped by the windows and the hard cap
    assert occ.gpu_batch_size(per_copy_bytes=10 * 2**20, free_bytes=80 * gib, windows=729) == 729
    assert occ.gpu_batch_size(per_copy_bytes=10 * 2**20, free_bytes=80 * gib, windows=10**6) == 2048
    assert occ.gpu_batch_size(per_copy_bytes=2**20, free_bytes=80 * gib, windows=10**6) == occ._GPU_MAX_BATCH
    assert occ.gpu_batch_size(per_copy_bytes=100 * 2**20, free_bytes=2 * gib, windows=729) == 5
    assert occ.gpu_batch_size(per_copy_bytes=gib, free_bytes=gib, windows=729) == 1
    # on CPU an omitted batch_size is DEFAULT_BATCH_SIZE and never asks CUDA
    seen = []
    real = occ._occlusion_batched

    def spy(module, x, target, base, bl, wr, wc, batch_size, *rest):
        seen.append(batch_size)
        return real(module, x, target, base, bl, wr, wc, batch_size, *rest)

    monkeypatch.setattr(occ, "_occlusion_batched", spy)
    monkeypatch.setattr(occ, "_measured_gpu_batch", lambda *a: pytest.fail("asked the GPU on a CPU input"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(1, 3, 16, 16)
    a = occ.occlusion(model, x, 0, window=4, stride=4, incremental=False)
    assert seen == [occ.DEFAULT_BATCH_SIZE] and a.shape == x.shape
