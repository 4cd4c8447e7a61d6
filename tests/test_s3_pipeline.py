"""The whole pipeline on a dataset served by an S3 server on 127.0.0.1 (moto): every stage that re-reads
images opens them through ``tasks.core.images.open_stored_image`` with the artefact's ``s3://`` dataset root.

Before the one-opener rule, ``extract`` worked on S3 but ``audit`` reported every image unreadable,
``neurons max-act`` failed with "no image could be decoded" and the report had no thumbnails.
"""

from __future__ import annotations

import json

import pytest

from conftest import make_color_dataset

pytestmark = pytest.mark.timeout(600)


def test_whole_pipeline_on_s3(s3_server, tmp_path):
    import s3fs

    from reports.render import build_report, write_report
    from storage.features import read_meta
    from storage.paths import Store
    from tasks.attribution.audit import AuditConfig, run_audit
    from tasks.extract.features import ExtractConfig, run_extraction
    from tasks.index.build import build_default_indexes
    from tasks.index.dataset_audit import audit_dataset
    from tasks.index.neighbors import neighbors
    from tasks.maps.defaults import make_default_maps
    from tasks.neurons.max_activations import run_max_activations

    data = make_color_dataset(tmp_path / "data", per_class=3)
    files = sorted(data.rglob("*.png"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("photos")
    for p in files:
        fs.put_file(str(p), f"photos/set/{p.relative_to(data).as_posix()}")
    store = str(tmp_path / "store")

    m = run_extraction(ExtractConfig(data="s3://photos/set", store=store, model="resnet18", weights="none",
                                     resize=40, crop=32, device="cpu", progress=False))
    assert m["rows"] == len(files) and m["dataset_root"].startswith("s3://photos/set")
    fid = m["artefact_id"]

    idx = build_default_indexes(store, fid, gpu="off")
    assert idx["pixel"]["rows"] == len(files)  # the pixel index decodes every image from S3
    nb = neighbors(store, path="train/red/red_train_0.png", k=3, space="pixel")
    assert len(nb) == 3
    audit_dataset(store)

    maps = make_default_maps(store, fid)
    assert maps["grid"]["missing_images"] == 0 and maps["grid"]["filled"] >= 16  # 4x4: the largest square <= 18

    att = run_audit(AuditConfig(store=store, methods=("saliency", "occlusion"), n=3, window=16, stride=16,
                                device="cpu", progress=False))
    assert att["last_run"]["failed"] == [] and att["last_run"]["computed"] >= 3

    ma = run_max_activations(store, layer="layer1", features_id=fid, k=2, png_channels=2, device="cpu")
    assert ma["images_scanned"] == len(files) and ma["images_skipped"] == 0

    ctx = build_report(store, fid)
    thumbs = json.loads(ctx["thumbs_json"])
    assert len(thumbs) == len(files)
    out = write_report(store, str(tmp_path / "r.html"), fid)
    assert "data:image/jpeg;base64," in open(out, encoding="utf-8").read()
    meta = read_meta(Store(store).artefact_dir("features", fid), m)
    assert set(meta["path"]) == {p.relative_to(data).as_posix() for p in files}
