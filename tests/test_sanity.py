"""Model-parameter randomisation sanity check (tasks/attribution/sanity.py): on a tiny model whose top layer
decides where the evidence is, the gradient map changes when that layer is randomised, while a "method" that
never looks at the weights (an edge detector) is flagged; the verdict is stored and shows in the report."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_color_dataset


class SpatialReadout(nn.Module):
    """conv(3->4, 3x3) - ReLU - flatten - Linear(4*16*16 -> 3). The trained read-out of class 0 looks at the
    image's centre only, so its gradient map is a bright centre; a re-initialised read-out looks everywhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 3)
        with torch.no_grad():
            self.conv.bias.fill_(0.5)  # every unit alive
            w = torch.zeros(3, 4, 16, 16)
            w[0, :, 5:11, 5:11] = 1.0
            w[1, :, :4, :] = 1.0
            w[2, :, -4:, :] = 1.0
            self.fc.weight.copy_(w.reshape(3, -1))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def _gradient(model, x, t):
    from tasks.attribution.saliency import vanilla_gradient

    return vanilla_gradient(model, x, t, reduce="max")


def _edges(model, x, t):
    """Sobel magnitude of the grey image: depends on the input only, never on the model."""
    g = x.mean(1, keepdim=True)
    k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    return (F.conv2d(g, k, padding=1) ** 2 + F.conv2d(g, k.transpose(2, 3), padding=1) ** 2).sqrt()[:, 0]


def _inputs(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=16, mode="bilinear", align_corners=False)


def test_spearman_and_ssim_by_hand():
    from tasks.attribution.sanity import spearman, ssim

    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(0.9486833, rel=1e-6)  # ties
    assert math.isnan(spearman(np.ones(4), np.arange(4.0)))
    m = torch.rand(40, 40, generator=torch.Generator().manual_seed(0))
    assert ssim(m, m, 16) == pytest.approx(1.0, abs=1e-6)
    assert ssim(m, 1 - m, 16) < 0


def test_cascade_randomises_from_the_top_and_is_seeded():
    from tasks.attribution.sanity import default_depths, parametrised_layers, randomised_copy, verdict_depth

    m = SpatialReadout().eval()
    layers = parametrised_layers(m)
    assert layers == ["conv", "fc"]
    assert default_depths(2) == [1, 2] and verdict_depth(2) == 1 and default_depths(53) == [1, 2, 3, 14, 27, 53]
    r1 = randomised_copy(m, layers, 1, seed=3)
    assert torch.equal(r1.conv.weight, m.conv.weight) and not torch.equal(r1.fc.weight, m.fc.weight)
    r2 = randomised_copy(m, layers, 2, seed=3)
    assert torch.equal(r2.fc.weight, r1.fc.weight)  # a cascade: depth 2 keeps depth 1's random top layer
    assert not torch.equal(r2.conv.weight, m.conv.weight)
    assert torch.equal(randomised_copy(m, layers, 1, seed=3).fc.weight, r1.fc.weight)  # seeded
    assert m.fc.weight[0].reshape(4, 16, 16)[0, 8, 8] == 1.0  # the original is untouched


def test_gradient_changes_when_the_top_layer_is_randomised_edges_are_flagged():
    from tasks.attribution.sanity import sanity_table, verdicts

    m = SpatialReadout().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x = _inputs()
    table = sanity_table(m, x, torch.zeros(3, dtype=torch.long), {"saliency": _gradient, "edges": _edges}, seed=0)
    assert set(table.columns) >= {"method", "depth", "layers", "top_layer", "image", "spearman", "ssim", "constant"}
    top = table[(table["depth"] == 1)]
    sal = top[top["method"] == "saliency"]
    assert (sal["top_layer"] == "fc").all()
    assert sal["spearman"].max() < 0.5, sal  # the read-out decided where the evidence is: the map moved
    edg = table[table["method"] == "edges"]
    assert np.allclose(edg["spearman"], 1.0) and np.allclose(edg["ssim"], 1.0)
    v = verdicts(table, threshold=0.8)
    assert v["edges"]["flagged"] and v["edges"]["verdict"] == "does not depend on what the model learned"
    assert not v["saliency"]["flagged"] and v["saliency"]["depth"] == 1
    assert [c[0] for c in v["saliency"]["curve"]] == [1, 2]


@pytest.fixture(scope="module")
def audited_store(tmp_path_factory):
    from tasks.attribution.audit import AuditConfig, run_audit
    from tasks.extract.features import ExtractConfig, run_extraction

    root = tmp_path_factory.mktemp("sanity")
    data = make_color_dataset(root / "data", per_class=1, size=(40, 36), splits=("",))
    store = root / "store"
    run_extraction(ExtractConfig(data=str(data), store=str(store), model="mobilenet_v3_small", weights="none",
                                 progress=False, num_workers=0))
    man = run_audit(AuditConfig(store=str(store), methods=("saliency",), n=2, faith_steps=2, batch_size=16, thumb=64,
                                progress=False))
    return store, man


def test_run_sanity_stores_the_verdicts_and_the_report_shows_them(audited_store, tmp_path):
    from reports.render import write_report
    from storage.audits import SANITY_COLUMNS, read_sanity, read_scores
    from tasks.attribution.sanity import SanityConfig, run_sanity

    store, man = audited_store
    cfg = SanityConfig(n=2, depths=(1, 10), ssim_px=16)
    out = run_sanity(store, cfg=cfg, map_fns={"edges": _edges})
    assert out["kind"] == "attribution-sanity" and out["attribution"]["id"] == man["artefact_id"]
    assert out["images"] == 2 and set(out["methods"]) == {"saliency", "edges"}
    assert out["verdicts"]["edges"]["flagged"] and not out["verdicts"]["saliency"]["flagged"]
    table, m = read_sanity(store, man["artefact_id"])
    assert tuple(table.columns) == SANITY_COLUMNS and len(table) == 2 * 2 * 2  # methods x depths x images
    assert m["artefact_id"] == out["artefact_id"] and set(table["path"]) <= set(read_scores(store)[0]["path"])
    html = Path(write_report(store, out=tmp_path / "r.html")).read_text("utf-8")
    attribution = html[html.index('<section id="attribution"'):html.index('<section id="images"')]
    assert "Flagged: edges" in attribution and "does not depend on what the model learned" in attribution
    assert re.search(r'<tr class="flagged" data-method="edges">', attribution)
    assert re.search(r'<tr class="" data-method="saliency">', attribution)


def test_sanity_errors_say_what_to_do(audited_store, tmp_path):
    from storage.errors import StoreError, UsageError
    from tasks.attribution.sanity import SanityConfig, run_sanity

    store, _ = audited_store
    with pytest.raises(UsageError, match="not in audit"):
        run_sanity(store, methods=("gradcam",))
    with pytest.raises(UsageError, match="sanity-n"):
        run_sanity(store, cfg=SanityConfig(n=0))
    with pytest.raises(StoreError, match="convlens audit"):
        run_sanity(tmp_path / "empty-store")


def test_audit_sanity_cli(audited_store, capsys):
    import json

    from flows.cli import main

    store, man = audited_store
    assert main(["--no-prefect", "audit-sanity", "--store", str(store), "--n", "0"]) == 2
    assert "--sanity-n must be >= 1" in capsys.readouterr().err
    assert main(["--no-prefect", "audit-sanity", "--store", str(store), "--n", "1", "--sanity-depths", "1,2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attribution"] == man["artefact_id"] and out["images"] == 1 and set(out["verdicts"]) == {"saliency"}
    assert out["verdict_depth"] == 2 and out["verdicts"]["saliency"]["flagged"] is False
