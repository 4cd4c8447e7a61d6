"""benchmarks/gpu.sh --device cpu: the dry run of the prepared GPU benchmark runs green on a CPU-only machine and
writes every section's JSON with the keys the GPU run will fill (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-bench-out")
    env = {**os.environ, "OUT": str(out)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, out


def _load(out: Path, name: str) -> dict:
    p = out / f"{name}.json"
    assert p.is_file(), f"{name}.json was not written"
    return json.loads(p.read_text())


def test_dry_run_exits_zero_and_writes_every_section(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.glob("*.json")} == {"env.json", "extract.json", "occlusion.json", "knn.json", "summary.json"}
    for name in ("env", "extract", "occlusion", "knn"):
        d = _load(out, name)
        assert d["section"] == name and d["device"] == "cpu" and d["status"] in ("ok", "skipped"), d
        assert "peak_gpu_mem_mb" in d and "section_seconds" in d


def test_extract_section_compares_gpu_and_cpu_decode(dry_run):
    d = _load(dry_run[1], "extract")
    assert d["status"] == "ok", d.get("error")
    assert d["images"] == 64
    runs = d["runs"]
    assert {k: v["decode"] for k, v in runs.items()} == {"gpu_decode": "torchvision-jpeg", "cpu_decode": "jpeg-draft",
                                                          "cpu_full_decode": "full"}
    for r in runs.values():
        assert r["img_s"] > 0 and r["seconds"] > 0 and "peak_gpu_mem_mb" in r
    assert d["ratio_gpu_vs_cpu_decode"] > 0 and d["ratio_draft_vs_full_cpu_decode"] > 0
    assert d["feature_diff_gpu_vs_full"]["images"] == 64 and d["feature_diff_gpu_vs_full"]["rel_l2_max"] <= 0.05
    assert d["feature_diff_draft_vs_full"]["images"] == 64
    assert d["model_only_img_s"] > 0


def test_occlusion_and_knn_sections(dry_run):
    out = dry_run[1]
    occ = _load(out, "occlusion")
    if occ["status"] == "ok":
        r = occ["result"]["results"]["resnet18"]
        assert r["vs_captum_best_warm"] > 0
        assert r["max_abs_diff_vs_captum_best"] <= 1e-4 * max(1.0, r["max_abs_attribution"])
        assert occ["result"]["device"] == "cpu"
    else:
        assert "captum" in occ["reason"]
    knn = _load(out, "knn")
    assert knn["status"] == "ok" and knn["n"] == 1000 and knn["d"] == 64
    assert knn["cpu"]["queries"] == 200 and knn["cpu"]["queries_per_s"] > 0
    assert "graph_seconds_extrapolated" in knn["cpu"]
    if knn["faiss_gpus"] == 0:
        assert knn["gpu"]["status"] == "skipped"


def test_summary(dry_run):
    s = _load(dry_run[1], "summary")
    assert s["status"] == "ok" and s["device"] == "cpu (dry run)"
    assert set(s["sections"]) == {"env", "extract", "occlusion", "knn"}
    assert set(s["extract_img_s"]) == {"gpu_decode", "cpu_decode", "cpu_full_decode"}
    assert "ratio_gpu_vs_cpu_decode" in s and "knn_ratio_gpu_vs_cpu" in s and "peak_gpu_mem_mb" in s
