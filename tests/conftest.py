"""Shared fixtures: tiny hand-built models, generated image datasets, one Prefect server per session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Tests never reach a user's Prefect API; flows under test use the session harness below.
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (``prefect_test_harness``) shared by the whole test session (~40 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def make_color_dataset(root: Path, per_class: int = 4, size: tuple[int, int] = (48, 40),
                       splits: tuple[str, ...] = ("train", "test"), seed: int = 0) -> Path:
    """An ImageFolder of solid-colour-ish PNGs: ``root/<split>/<red|green|blue>/<i>.png`` (distinct bytes)."""
    rng = np.random.default_rng(seed)
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    from PIL import Image

    for split in splits:
        for name, rgb in colors.items():
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = np.empty((size[1], size[0], 3), np.uint8)
                arr[:] = rgb
                arr = np.clip(arr.astype(int) + rng.integers(-25, 25, arr.shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{name}_{split}_{i}.png")
    return root


@pytest.fixture
def color_dataset(tmp_path: Path) -> Path:
    return make_color_dataset(tmp_path / "data")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """An S3 server (moto) on 127.0.0.1 for the test; fsspec / s3fs point at it. Yields its endpoint URL."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    import fsspec

    fsspec.config.conf["s3"] = {"endpoint_url": f"http://127.0.0.1:{port}"}
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        fsspec.config.conf.pop("s3", None)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
