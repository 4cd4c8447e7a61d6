"""Transfer-learning comparison: two feature artefacts of the same images (frozen vs fine-tuned backbone, or
two layers of one model) compared on what the features make easy.

Rows are matched by ``path`` (inner join; images in only one artefact are dropped and counted). Metrics:
- ``knn_accuracy``: leave-one-out majority vote of the ``k`` nearest neighbours (cosine, exact FAISS);
- ``linear_probe_accuracy``: scikit-learn logistic regression on standardised features — fit on
  ``split == "train"`` and scored on the other rows when both exist, else 5-fold stratified cross-validation
  (fewer folds for small classes);
- ``neighbour_overlap``: mean over images of ``|N_A(i) ∩ N_B(i)| / k`` (same images, two spaces).
Memory O(N x (D_A + D_B)) (both tables are loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storage.errors import UsageError
from storage.features import load_features
from storage.paths import Store
from tasks.core.faiss_index import knn_search
from tasks.neurons.common import bar_chart, publish, write_png, write_table

__all__ = ["knn_neighbours", "knn_accuracy", "linear_probe_accuracy", "neighbour_overlap", "compare_spaces",
           "run_compare"]


def knn_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """``(N, k)`` indices of each row's k nearest other rows (cosine, exact FAISS), self excluded."""
    idx, _ = knn_search(np.ascontiguousarray(x, dtype=np.float32), k, metric="cosine", exclude_self=True)
    return idx.astype(np.int64)


def knn_accuracy(neigh: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a majority vote (ties -> nearest neighbour's label among the tied)."""
    correct = 0
    for i, row in enumerate(neigh):
        votes: dict[Any, int] = {}
        for j in row:
            votes[labels[j]] = votes.get(labels[j], 0) + 1
        best = max(votes.values())
        winner = next(labels[j] for j in row if votes[labels[j]] == best)
        correct += int(winner == labels[i])
    return correct / max(1, len(neigh))


def linear_probe_accuracy(x: np.ndarray, labels: np.ndarray, splits: np.ndarray | None = None, seed: int = 0
                          ) -> tuple[float, str]:
    """Logistic-regression probe accuracy and how it was measured (``train/test`` or ``cv<k>``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    if splits is not None:
        train = splits == "train"
        test = ~train
        if train.any() and test.any() and len(set(labels[train])) > 1:
            clf.fit(x[train], labels[train])
            return float((clf.predict(x[test]) == labels[test]).mean()), "train/test"
    _, counts = np.unique(labels, return_counts=True)
    folds = int(min(5, counts.min()))
    if folds < 2 or len(counts) < 2:
        return float("nan"), "too few labelled images per class"
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, labels, cv=cv).mean()), f"cv{folds}"


def neighbour_overlap(na: np.ndarray, nb: np.ndarray) -> float:
    """Mean fraction of shared neighbours between two ``(N, k)`` neighbour lists."""
    k = na.shape[1]
    if k == 0:
        return float("nan")
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(na, nb)]))


def compare_spaces(xa: np.ndarray, xb: np.ndarray, labels: np.ndarray | None, splits: np.ndarray | None = None,
                   k: int = 10) -> pd.DataFrame:
    """Metrics table: rows ``metric``, ``space`` (``a``, ``b`` or ``a~b``), ``value``, ``detail``."""
    if len(xa) != len(xb):
        raise UsageError("the two feature sets must have the same rows")
    if len(xa) < 3:
        raise UsageError(f"need at least 3 shared images to compare, got {len(xa)}")
    k = min(k, len(xa) - 1)
    na, nb = knn_neighbours(xa, k), knn_neighbours(xb, k)
    recs = [{"metric": "neighbour_overlap", "space": "a~b", "value": neighbour_overlap(na, nb), "detail": f"k={k}"}]
    if labels is not None:
        for space, x, n in (("a", xa, na), ("b", xb, nb)):
            recs.append({"metric": "knn_accuracy", "space": space, "value": knn_accuracy(n, labels), "detail": f"k={k}"})
            acc, how = linear_probe_accuracy(x, labels, splits)
            recs.append({"metric": "linear_probe_accuracy", "space": space, "value": acc, "detail": how})
    return pd.DataFrame(recs)


def run_compare(store: str | Path, features_a: str, features_b: str, k: int = 10, force: bool = False) -> dict[str, Any]:
    """Compare two feature artefacts of the same images.

    Files: ``compare.parquet`` (:func:`compare_spaces` rows), ``compare.png`` (bar chart).
    """
    s = Store(store)
    aid_a, ma = s.resolve("features", features_a)
    aid_b, mb = s.resolve("features", features_b)
    if aid_a == aid_b:
        raise UsageError("compare needs two different feature artefacts (--a and --b are the same)")
    key = {"features_a": aid_a, "created_a": ma.get("created"), "features_b": aid_b, "created_b": mb.get("created"),
           "params": {"k": k}}

    def build(adir: Path):
        meta_a, xa = load_features(s.artefact_dir("features", aid_a), ma)
        meta_b, xb = load_features(s.artefact_dir("features", aid_b), mb)
        ia = pd.Series(np.arange(len(meta_a)), index=meta_a["path"])
        ib = pd.Series(np.arange(len(meta_b)), index=meta_b["path"])
        shared = sorted(set(ia.index) & set(ib.index))
        ra, rb = ia.loc[shared].to_numpy(), ib.loc[shared].to_numpy()
        lab = meta_a["label"].to_numpy()[ra]
        has_labels = bool(pd.notna(lab).all()) and len(set(lab)) > 1
        spl = meta_a["split"].to_numpy()[ra]
        df = compare_spaces(xa[ra], xb[rb], lab.astype(str) if has_labels else None,
                            spl.astype(str) if pd.notna(spl).all() else None, k)
        chart = bar_chart({f"{r.metric} [{r.space}]": float(r.value) for r in df.itertuples()},
                          f"A={aid_a[:24]}  B={aid_b[:24]}", width=420)
        files = [write_table(adir, "compare.parquet", df), write_png(adir, "compare.png", chart)]
        return files, {"features_a": aid_a, "features_b": aid_b, "shared_images": len(shared),
                       "only_a": len(ia) - len(shared), "only_b": len(ib) - len(shared), "k": k,
                       "layer_a": ma.get("layer", {}).get("name"), "layer_b": mb.get("layer", {}).get("name"),
                       "metrics": df.to_dict(orient="records")}

    return publish(store, "compare", f"{ma['model'].get('arch')}-vs-{mb['model'].get('arch')}", key, build, force)
