"""Neighbour queries on real images: pixel vs feature space, --image embedding, --path forms, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from index_fixtures import build_planted_dataset
from tasks.index.build import build_default_indexes
from tasks.index.neighbors import neighbors


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    from tasks.extract.features import ExtractConfig, run_extraction

    base = tmp_path_factory.mktemp("nb")
    data = build_planted_dataset(base / "data")
    store = base / "store"
    run_extraction(ExtractConfig(data=str(data), store=str(store), model="resnet18", weights="none", progress=False,
                                 num_workers=0))
    summary = build_default_indexes(str(store))
    assert summary["feature"]["rows"] == 31 and summary["pixel"]["rows"] == 31
    assert summary["pixel"]["metric"] == "l2" and summary["feature"]["metric"] == "cosine"
    return str(store), data


def test_pixel_vs_feature_neighbours_differ(planted_store: tuple[str, Path]) -> None:
    """An inverted (shifted) checkerboard is the farthest image in pixel space but the nearest in feature space
    (avg-pooled conv features are near translation-invariant); flat grey is the pixel-space neighbour."""
    store, _ = planted_store
    feat = neighbors(store, path="test/pattern/checker.png", k=30, space="feature")
    pix = neighbors(store, path="test/pattern/checker.png", k=30, space="pixel")
    assert feat["path"].iloc[0] == "test/pattern/checker_shifted.png"
    assert pix["path"].iloc[0] == "test/pattern/grey.png"
    assert pix["path"].iloc[-1] == "test/pattern/checker_shifted.png"
    # squared L2 over 32x32x3 pixels in [0, 1]: the inverted board differs by ~1 per pixel (less at edges
    # blurred by the downsampling), flat grey by 0.5
    assert pix["distance"].iloc[-1] > 2 * pix["distance"].iloc[0]
    assert pix["similarity"].isna().all() and (feat["similarity"] == 1 - feat["distance"]).all()


def test_image_query_uses_the_artefacts_model(planted_store: tuple[str, Path], tmp_path: Path) -> None:
    store, data = planted_store
    # a stored file passed as a new image embeds to the stored vector: distance ~0 to itself and its duplicate
    outside = tmp_path / "query.png"
    shutil.copy(data / "train/red/red_train_0.png", outside)
    df = neighbors(store, image=str(outside), k=3)
    assert set(df["path"].iloc[:2]) == {"train/red/red_train_0.png", "train/red/dup_copy.png"}
    assert df["distance"].iloc[:2].max() < 1e-5
    px = neighbors(store, image=str(outside), k=2, space="pixel")
    assert set(px["path"]) == {"train/red/red_train_0.png", "train/red/dup_copy.png"} and px["distance"].max() < 1e-9
    # --path: stored relative path and absolute path give the same answer; the query is not its own neighbour
    a = neighbors(store, path="train/red/red_train_0.png", k=4)
    b = neighbors(store, path=str(data / "train/red/red_train_0.png"), k=4)
    assert list(a["path"]) == list(b["path"]) and "train/red/red_train_0.png" not in set(a["path"])
    assert a["path"].iloc[0] == "train/red/dup_copy.png" and a["distance"].iloc[0] < 1e-6
    assert set(a["label"].iloc[1:]) == {"red"}


def test_clear_errors(planted_store: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    store, _ = planted_store
    notimg = tmp_path / "notes.png"
    notimg.write_text("this is not an image")
    with pytest.raises(ValueError, match=r"notes\.png is not a usable image"):
        neighbors(store, image=str(notimg))
    with pytest.raises(ValueError, match="unknown image_id 'ffffffffffff'"):
        neighbors(store, image_id="ffffffffffff")
    with pytest.raises(ValueError, match="is not in index"):
        neighbors(store, path="train/red/missing.png")
    with pytest.raises(ValueError, match="exactly one of"):
        neighbors(store)
    assert main(["--no-prefect", "neighbors", "--store", store, "--image", str(notimg)]) == 2
    assert "not a usable image" in capsys.readouterr().err
    assert main(["--no-prefect", "neighbors", "--store", store, "--path", "test/pattern/grey.png", "--space", "pixel",
                 "-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["space"] == "pixel" and len(out["neighbors"]) == 2 and out["stale"] is None
