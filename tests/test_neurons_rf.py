"""Receptive fields: analytic values equal hand-computed ones; the empirical fallback agrees."""

from __future__ import annotations

import pytest
import torch
from torchvision import models

from tasks.neurons.receptive_field import analytic_receptive_field, empirical_receptive_field, receptive_field


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return models.alexnet(weights=None).eval()


def test_alexnet_by_hand(alexnet):
    # conv1 11x11 stride 4 pad 2; pool1 3x3 stride 2 -> 11 + 2*4 = 19, stride 8; conv2 5x5 pad 2 -> 19 + 4*8 = 51
    rf = analytic_receptive_field(alexnet, "features.0")
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((11, 11), (4, 4), (-2, -2), "analytic-fx")
    assert analytic_receptive_field(alexnet, "features.2").size == (19, 19)
    assert analytic_receptive_field(alexnet, "features.2").stride == (8, 8)
    assert analytic_receptive_field(alexnet, "features.3").size == (51, 51)
    assert analytic_receptive_field(alexnet, "features.12").size == (195, 195)  # pool5, the classic value
    assert analytic_receptive_field(alexnet, "classifier.1").size is None  # after flatten: global


def test_vgg16_by_hand():
    vgg = models.vgg16(weights=None)
    assert analytic_receptive_field(vgg, "features.0").size == (3, 3)
    assert analytic_receptive_field(vgg, "features.2").size == (5, 5)  # conv1_2
    pool1 = analytic_receptive_field(vgg, "features.4")
    assert (pool1.size, pool1.stride) == ((6, 6), (2, 2))
    assert analytic_receptive_field(vgg, "features.30").size == (212, 212)  # pool5


def test_resnet_traced_through_blocks_matches_empirical():
    torch.manual_seed(0)
    r = models.resnet18(weights=None).eval()
    a = analytic_receptive_field(r, "layer1")
    assert a.method == "analytic-fx" and a.size == (43, 43) and a.stride == (4, 4)
    e = empirical_receptive_field(r, "layer1", input_size=96)
    assert e.method == "empirical-gradient" and e.size == a.size and e.stride == a.stride and e.offset == a.offset


def test_empirical_matches_alexnet(alexnet):
    e = empirical_receptive_field(alexnet, "features.2", input_size=127)
    a = analytic_receptive_field(alexnet, "features.2")
    assert (e.size, e.stride) == (a.size, a.stride)


def test_fallback_names_method_and_unknown_layer_raises(alexnet):
    m = models.shufflenet_v2_x0_5(weights=None).eval()  # channel shuffle (transpose) is not walked
    rf = receptive_field(m, "stage2.0.branch2.0", input_size=64)
    assert rf.method in ("analytic-fx", "empirical-gradient") and rf.size is not None
    with pytest.raises(ValueError, match="unknown layer"):
        receptive_field(alexnet, "nope.3")


def test_box_is_clipped(alexnet):
    rf = analytic_receptive_field(alexnet, "features.0")
    assert rf.box(0, 0, 224, 224) == (0, 0, 9, 9)
    assert rf.box(2, 3, 224, 224) == (10, 6, 21, 17)
