"""Conv+BN folding used by the extraction fast path: same maths, names kept, hooked layer untouched."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn

from tasks.core.forward import CPU_MICRO_BATCH, CpuStreams, cpu_streams_plan, forward_batch, prepare_module
from tasks.core.hooks import LayerRef, capture
from tasks.core.models import fold_conv_bn


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(num_classes=10)
    # non-trivial running statistics, so a missing fold would show
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def test_fold_equals_unfolded_and_keeps_names():
    m = _model()
    f = fold_conv_bn(m)
    x = torch.rand(3, 3, 96, 96)
    with torch.inference_mode():
        a, b = m(x), f(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert set(dict(m.named_modules())) == set(dict(f.named_modules()))
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in f.modules())
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()), "the original must not be changed"


def test_hooked_conv_keeps_its_pre_bn_output():
    m = _model()
    ref = LayerRef(alias="features.1.conv.1", name="features.1.conv.1")  # a conv followed by a BN in its Sequential
    assert isinstance(dict(m.named_modules())[ref.name], nn.Conv2d)
    f = prepare_module(m, torch.device("cpu"), ref)
    assert isinstance(dict(f.named_modules())["features.1.conv.2"], nn.BatchNorm2d)
    assert isinstance(dict(f.named_modules())["features.2.conv.3"], nn.Identity)  # others folded
    x = torch.rand(2, 3, 64, 64)
    with capture(m, ref) as acts, torch.inference_mode():
        m(x)
        want = acts[ref.alias].clone()
    with capture(f, ref) as acts, torch.inference_mode():
        f(x.contiguous(memory_format=torch.channels_last))
        got = acts[ref.alias].clone()
    assert torch.allclose(want, got, atol=1e-5)


def test_micro_batched_forward_equals_one_pass():
    m = _model()
    ref = LayerRef(alias="penultimate", name="classifier.1", side="input")
    f = prepare_module(m, torch.device("cpu"), ref)
    n = CPU_MICRO_BATCH * 2 + 3  # chunks that don't divide the batch
    x = torch.rand(n, 3, 64, 64)
    feats, preds, probs = forward_batch(f, x, ref, "avg", torch.device("cpu"), True)
    with capture(m, ref) as acts, torch.inference_mode():
        out = m(x)
        want = acts[ref.alias]
    assert feats.shape == (n, 1280) and preds.shape == (n, 5) and probs.shape == (n, 5)
    assert torch.allclose(torch.from_numpy(feats), want, rtol=1e-4, atol=1e-5)
    assert (torch.from_numpy(preds[:, 0]).long() == out.argmax(1)).all()


def test_cpu_streams_give_the_same_bits_and_share_weights():
    """Micro-batches spread over parameter-sharing copies (one thread each) give byte-identical features to one
    stream: which copy takes a chunk must never change a stored feature."""
    m = _model()
    ref = LayerRef(alias="penultimate", name="classifier.1", side="input")
    f = prepare_module(m, torch.device("cpu"), ref)
    x = torch.rand(CPU_MICRO_BATCH * 4 + 3, 3, 64, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward_batch(f, x, ref, "avg", torch.device("cpu"), True)
        with CpuStreams(f, 3) as streams:
            assert streams.n == 3
            copies = []
            streams.map(lambda mod, _c: copies.append(mod), [0, 1, 2, 3, 4, 5])
            assert {id(p) for c in copies for p in c.parameters()} == {id(p) for p in f.parameters()}
            many = forward_batch(f, x, ref, "avg", torch.device("cpu"), True, streams=streams)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert np.array_equal(a, b)
    assert cpu_streams_plan(64, 2) == (2, 1) and cpu_streams_plan(4, 2) == (1, 2) and cpu_streams_plan(64, 1) == (1, 1)


def test_bf16_precision_is_a_separate_artefact_and_recorded(tmp_path):
    from conftest import make_color_dataset
    from storage.features import load_features
    from storage.paths import Store
    from tasks.extract.features import ExtractConfig, run_extraction

    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    common = dict(data=str(data), store=str(tmp_path / "s"), model="resnet18", weights="none", progress=False)
    m32 = run_extraction(ExtractConfig(**common))
    m16 = run_extraction(ExtractConfig(**common, precision="bf16"))
    assert m32["precision"] == "fp32" and m16["precision"] == "bf16"
    assert m32["artefact_id"] != m16["artefact_id"]
    assert m16["run"]["extracted"] == m16["rows"] == 6  # nothing reused from the fp32 artefact
    st = Store(tmp_path / "s")
    _, f32 = load_features(st.artefact_dir("features", m32["artefact_id"]), m32)
    _, f16 = load_features(st.artefact_dir("features", m16["artefact_id"]), m16)
    assert f16.dtype == np.float32
    assert not np.array_equal(f32, f16)
    assert np.allclose(f32, f16, rtol=0.1, atol=0.05 * np.abs(f32).max())
