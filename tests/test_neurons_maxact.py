"""Max-activating images/patches, filters, activations, invariance and transfer comparison on hand-built models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from storage.errors import ChecksumError
from storage.manifest import read_manifest
from storage.neurons import read_table
from storage.paths import Store
from tasks.extract.features import ExtractConfig, run_extraction
from tasks.neurons.common import Source
from tests.neurons_helpers import PRE64, make_square_dataset, tiny_lm


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("neurons")
    data = root / "data"
    where = make_square_dataset(data)
    store = root / "store"
    lm = tiny_lm()
    m = run_extraction(ExtractConfig(data=str(data), store=str(store), model="tiny", weights="none", progress=False,
                                     num_workers=0), lm=lm)
    s = Store(store)
    src = Source(lm, PRE64, m["artefact_id"], s.artefact_dir("features", m["artefact_id"]), m)
    return {"store": store, "where": where, "src": src, "features": m, "data": data}


def test_colour_channel_ranks_its_colour_first_and_boxes_contain_it(squares):
    from tasks.neurons.max_activations import run_max_activations

    m = run_max_activations(squares["store"], "features.4", k=4, source=squares["src"], png_channels=2)
    assert m["technique"] == "max_activations" and m["receptive_field"]["size"] == [8, 8]
    adir = Store(squares["store"]).artefact_dir("neurons", m["artefact_id"])
    hits = read_table(adir, m)
    ch0 = hits[hits["channel"] == 0].sort_values("rank")
    assert len(ch0) == 4 and all(p.startswith("red/") for p in ch0["path"])
    for h in ch0.itertuples():
        y, x = squares["where"][h.path]
        assert h.box_x0 <= x and h.box_y0 <= y and h.box_x1 >= x + 6 and h.box_y1 >= y + 6, (h, (y, x))
        assert h.box_x1 - h.box_x0 <= 8
    # memory contract: k rows per channel, every channel present
    assert sorted(hits.groupby("channel").size().unique()) == [4] and hits["channel"].nunique() == 4
    names = {f["name"] for f in m["files"]}
    assert "max_activations.parquet" in names and any(n.startswith("patches-") for n in names)
    # a rerun reuses the artefact; a corrupted file is caught by the reader
    again = run_max_activations(squares["store"], "features.4", k=4, source=squares["src"], png_channels=2)
    assert again["reused"] and again["artefact_id"] == m["artefact_id"]
    (adir / "max_activations.parquet").write_bytes(b"garbage")
    with pytest.raises(ChecksumError):
        read_table(adir, read_manifest(adir))


def test_topk_streaming_equals_full_sort():
    from tasks.neurons.max_activations import TopK

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 3, 4, 5, generator=g)
    top = TopK.empty(3, 5)
    for i in range(0, 50, 7):
        top.update(acts[i:i + 7], torch.arange(i, min(50, i + 7)))
    full = acts.reshape(50, 3, -1).amax(dim=2).t()
    assert torch.equal(top.values, torch.topk(full, 5, dim=1).values)
    assert torch.equal(top.rows, torch.topk(full, 5, dim=1).indices)


def test_filters_activations_and_reuse(squares):
    from tasks.neurons.activations import run_activations
    from tasks.neurons.filters import run_filters

    f = run_filters(squares["store"], source=squares["src"], layers=["features.0", "features.3"])
    assert f["technique"] == "filters" and f["layers"] == ["features.0", "features.3"]
    adir = Store(squares["store"]).artefact_dir("neurons", f["artefact_id"])
    t = read_table(adir, f)
    assert len(t) == 8 and t.loc[(t["layer"] == "features.0") & (t["filter"] == 0), "l2_norm"].item() == pytest.approx(3 ** 0.5)
    from PIL import Image

    assert Image.open(adir / "filters-features_0.png").size[0] > 32
    a = run_activations(squares["store"], "features.1", source=squares["src"], n_images=3, max_channels=4)
    at = read_table(Store(squares["store"]).artefact_dir("neurons", a["artefact_id"]), a)
    red = at[at["path"].str.startswith("red/") & (at["channel"] == 0)]
    green = at[at["path"].str.startswith("green/") & (at["channel"] == 0)]
    assert len(a["images"]) == 3 and red["max"].min() > 0.5 and green["max"].max() < 0.05


def test_invariance_zero_at_identity(squares):
    from tasks.neurons.invariance import run_invariance

    m = run_invariance(squares["store"], source=squares["src"], n_images=3, layer="features.4",
                       transforms={"translate": [-8, 0, 8], "scale": [0.8, 1.0, 1.25], "rotate": [-30, 0, 30]})
    df = read_table(Store(squares["store"]).artefact_dir("neurons", m["artefact_id"]), m)
    ident = df[((df["transform"] == "translate") & (df["value"] == 0)) | ((df["transform"] == "scale") & (df["value"] == 1))
               | ((df["transform"] == "rotate") & (df["value"] == 0))]
    assert len(ident) == 9 and (ident["distance"] == 0).all()
    assert (df.loc[df["value"].isin([-30, 30]), "distance"] > 0).all()
    assert {"invariance.png", "invariance.parquet"} <= {f["name"] for f in m["files"]}


def test_compare_spaces_known_answers():
    from tasks.neurons.transfer import compare_spaces

    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["a", "b", "c"]), 10)
    good = np.eye(3)[np.repeat(np.arange(3), 10)] * 5 + rng.normal(0, 0.3, (30, 3))
    noise = rng.normal(0, 1, (30, 3))
    df = compare_spaces(good.astype(np.float32), noise.astype(np.float32), labels, None, k=5).set_index(["metric", "space"])
    assert df.loc[("knn_accuracy", "a"), "value"] == 1.0
    assert df.loc[("linear_probe_accuracy", "a"), "value"] == 1.0
    assert df.loc[("knn_accuracy", "b"), "value"] < 0.7
    same = compare_spaces(good.astype(np.float32), good.astype(np.float32), labels, None, k=5)
    assert same.loc[same["metric"] == "neighbour_overlap", "value"].item() == 1.0


def test_run_compare_two_layers(squares):
    from tasks.neurons.transfer import run_compare

    lm = tiny_lm()
    m2 = run_extraction(ExtractConfig(data=str(squares["data"]), store=str(squares["store"]), model="tiny",
                                      weights="none", layer="features.1", progress=False, num_workers=0), lm=lm)
    out = run_compare(squares["store"], squares["features"]["artefact_id"], m2["artefact_id"], k=3)
    assert out["shared_images"] == 12 and out["technique"] == "compare"
    metrics = pd.DataFrame(out["metrics"]).set_index(["metric", "space"])
    assert set(metrics.index) == {("neighbour_overlap", "a~b"), ("knn_accuracy", "a"), ("knn_accuracy", "b"),
                                  ("linear_probe_accuracy", "a"), ("linear_probe_accuracy", "b")}
    assert all(0.0 <= v <= 1.0 for v in metrics["value"])
    assert metrics.loc[("linear_probe_accuracy", "a"), "detail"].startswith("cv")  # no train/test split here
    with pytest.raises(ValueError, match="two different"):
        run_compare(squares["store"], m2["artefact_id"], m2["artefact_id"])


def test_decode_workers_avoid_fork_when_foreign_threads_run(squares, monkeypatch):
    """After a Prefect flow ran in the process (event-loop / log threads alive), forked decode workers could die
    ("DataLoader worker exited unexpectedly"): max-act picks its worker start method like extraction does."""
    import threading

    import tasks.neurons.max_activations as ma
    from tasks.neurons.max_activations import max_activation_pass

    seen: list = []
    real = torch.utils.data.DataLoader

    def spy(*args, **kw):
        seen.append(kw.get("multiprocessing_context"))
        return real(*args, **kw)

    monkeypatch.setattr(ma.torch.utils.data, "DataLoader", spy)
    src = squares["src"]
    files = sorted(str(p) for p in squares["data"].rglob("*.png"))[:8]
    net = ma.Normalised(src.lm.module.eval(), src.preprocess.mean, src.preprocess.std)
    stop = threading.Event()
    foreign = threading.Thread(target=stop.wait, name="EventLoopThread", daemon=True)
    foreign.start()
    try:
        top, _size, skipped = max_activation_pass(net, files, src.preprocess, "features.4", k=2, batch_size=4,
                                                  device=torch.device("cpu"), num_workers=1)
    finally:
        stop.set()
        foreign.join()
    assert seen[-1] == "forkserver" and not skipped and top is not None
    seen.clear()
    max_activation_pass(net, files, src.preprocess, "features.4", k=2, batch_size=4, device=torch.device("cpu"),
                        num_workers=0)
    assert seen == [None]  # no worker processes, no start method
