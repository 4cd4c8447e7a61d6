"""Publishing wrappers, the CLI, evolution across checkpoints, and the one Prefect flow run."""

from __future__ import annotations

import pytest
import torch

from storage.neurons import read_table
from storage.paths import Store
from tasks.extract.features import ExtractConfig, run_extraction
from tasks.neurons.common import Source
from tests.neurons_helpers import PRE64, make_square_dataset, tiny_lm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("neurons-flow")
    make_square_dataset(root / "data", per_class=2)
    store = root / "store"
    lm = tiny_lm()
    m = run_extraction(ExtractConfig(data=str(root / "data"), store=str(store), model="tiny", weights="none",
                                     progress=False, num_workers=0), lm=lm)
    src = Source(lm, PRE64, m["artefact_id"], Store(store).artefact_dir("features", m["artefact_id"]), m)
    return {"root": root, "store": store, "src": src}


def _names(m):
    return {f["name"] for f in m["files"]}


def test_optimisation_wrappers_publish(setup):
    from tasks.neurons.adversarial import AdvConfig, run_adversarial
    from tasks.neurons.class_viz import ClassVizConfig, run_class_viz
    from tasks.neurons.deepdream import DreamConfig, run_deepdream
    from tasks.neurons.inversion import InversionConfig, run_inversion
    from tasks.neurons.style import StyleConfig, run_style

    store, src = setup["store"], setup["src"]
    cv = run_class_viz(store, ["red", 1], cfg=ClassVizConfig(size=32, steps=5), device="cpu", source=src)
    assert {"class-0.png", "class-1.png", "class_viz.png", "class_viz.parquet"} <= _names(cv)
    assert [c["class_name"] for c in cv["classes"]] == ["red", "green"]
    with pytest.raises(ValueError, match="unknown class"):
        run_class_viz(store, ["purple"], source=src)
    inv = run_inversion(store, ["features.1", "features.4"], n_images=1, cfg=InversionConfig(steps=5), source=src)
    t = read_table(Store(store).artefact_dir("neurons", inv["artefact_id"]), inv)
    assert set(t["layer"]) == {"features.1", "features.4"} and "inversion-000.png" in _names(inv)
    dr = run_deepdream(store, "features.4", n_images=1, cfg=DreamConfig(octaves=2, steps_per_octave=2), source=src)
    assert "dream-000.png" in _names(dr)
    adv = run_adversarial(store, n_images=3, n_examples=1, cfg=AdvConfig(eps_max=64 / 255), source=src)
    at = read_table(Store(store).artefact_dir("neurons", adv["artefact_id"]), adv)
    assert len(at) == 3 and set(at.columns) >= {"image_id", "eps", "eps_255", "flipped", "orig_class", "adv_class"}
    files = sorted((setup["root"] / "data").rglob("*.png"))
    st = run_style(store, str(files[0]), str(files[-1]), cfg=StyleConfig(steps=3, size=32), source=src)
    assert {"style.png", "style-result.png", "style.parquet"} <= _names(st)


def test_evolution_side_by_side(setup):
    from torchvision import models

    from tasks.neurons.evolution import run_evolution

    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = setup["root"] / f"epoch{seed}.pth"
        torch.save(models.squeezenet1_1(weights=None).state_dict(), path)
        ckpts.append(str(path))
    m = run_evolution(setup["store"], ckpts, arch="squeezenet1_1", layer="features.3", channels=[0, 1], k=2,
                      source=setup["src"])
    assert m["checkpoints"] == ["epoch0", "epoch1"] and m["filter_layer"] == "features.0"
    t = read_table(Store(setup["store"]).artefact_dir("neurons", m["artefact_id"]), m)
    assert set(t["checkpoint"]) == {0, 1} and {"evolution.png", "evolution-00.png", "evolution-01.png"} <= _names(m)
    # different weights: the ranked images or activations differ between checkpoints
    a, b = (t[t["checkpoint"] == i].sort_values(["channel", "rank"])["activation"].to_numpy() for i in (0, 1))
    assert len(a) == len(b) and not (a == b).all()


def test_cli_filters_and_errors(tmp_path, capsys):
    from flows.cli import main

    store = tmp_path / "store"
    assert main(["neurons", "filters", "--store", str(store), "--model", "resnet18", "--weights", "none", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"technique": "filters"' in out
    assert main(["neurons", "max-act", "--store", str(store)]) == 2  # no feature artefact: one-line error
    assert "no published features artefact" in capsys.readouterr().err


def test_flow_runs_under_prefect(prefect_server, tmp_path):
    from flows.neurons import neurons

    out = neurons("filters", str(tmp_path / "store"), {"model": "resnet18", "weights": "none", "layers": ["conv1", "layer1.0.conv1"]})
    assert out["technique"] == "filters" and out["layers"] == ["conv1", "layer1.0.conv1"]
    adir = Store(tmp_path / "store").artefact_dir("neurons", out["artefact_id"])
    assert (adir / "filters-conv1.png").is_file() and (adir / "filters-layer1_0_conv1.png").is_file()
