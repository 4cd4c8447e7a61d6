"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml), no module-level import
cycles anywhere in the four packages, ruff's configuration passes, and stages only open stored images through
``tasks.core.images``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: run `make test` (it installs the test extras)")
    return str(path)


def test_import_contracts_hold():
    r = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("flows", "tasks", "storage", "reports")
    # Tarjan's strongly connected components over module-level edges (function-level imports count too).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert cycles == []


def test_ruff_passes():
    r = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]


def test_dataset_images_are_opened_only_by_the_core_opener():
    """``Image.open`` on dataset images lives in tasks/core/images.py only; the report may open its own stored
    PNGs (artefact files, checksummed) but not dataset images."""
    offenders = []
    for path in list((ROOT / "tasks").rglob("*.py")) + list((ROOT / "reports").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "tasks/core/images.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bImage\.open\(", line) and "artefact" not in line:
                offenders.append(f"{rel}:{i}: {line.strip()}")
    allowed = {"reports/figures.py", "reports/sections/stored.py", "reports/sections/neurons.py"}  # stored PNGs
    assert [o for o in offenders if o.split(":")[0] not in allowed] == []
