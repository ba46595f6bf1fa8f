"""A DataComp-style shard's parquet sidecar with ``face_bboxes``: build_pool_index carries the
column into pool_index and detect_faces uses its boxes (issue 16 beside issue 13's sidecars)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from conftest import noise_png

from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.pipelines.curation.nodes import detect_faces_node

# normalised [x0, y0, x1, y1] per image, as DataComp's metadata gives them; image 2 has no face
BOXES = {0: [[0.25, 0.25, 0.75, 0.75]], 1: [[0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]], 2: []}


def _datacomp_shard(folder: Path) -> Path:
    folder.mkdir(parents=True)
    samples, rows = [], []
    for k, boxes in BOXES.items():
        key = f"0000000{k:02d}"
        samples.append({"__key__": key, "png": noise_png(k), "txt": f"a picture number {k}",
                        "json": {"key": key, "status": "success"}})
        rows.append({"key": key, "caption": f"a picture number {k}", "status": "success",
                     "face_bboxes": boxes})
    (path,) = write_shards(samples, str(folder / "tmp"), 10_000)
    Path(path).rename(folder / "00000.tar")
    (folder / "tmp").rmdir()
    pl.DataFrame(rows, schema={"key": pl.String, "caption": pl.String, "status": pl.String,
                               "face_bboxes": pl.List(pl.List(pl.Float64))}
                 ).write_parquet(folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    return folder


def test_sidecar_face_boxes_reach_detect_faces(tmp_path: Path) -> None:
    pool = ShardSet.open(str(_datacomp_shard(tmp_path / "pool")))
    index, _ = build_index(pool, IndexConfig(), progress=False)
    assert "face_bboxes" in index.columns and index["reject_reason"].null_count() == 3
    manifest = index.select("uid", "shard", "key", "position").with_columns(kept=pl.lit(True))
    run_on = ({}, {"kind": "local"}, False)
    replaced, stats = detect_faces_node(pool, manifest, index, {"sidecar": "replace"}, *run_on)
    by_key = dict(replaced.join(index.select("uid", "key"), on="uid").select("key", "boxes")
                  .iter_rows())
    assert stats["with_sidecar_boxes"] == 3 and len(by_key) == 3  # an empty list counts: no face
    assert by_key["000000000"] == [[16, 16, 48, 48]]  # fractions of the 64-px noise images
    assert sorted(by_key["000000001"]) == [[0, 32, 32, 64], [32, 0, 64, 32]]
    assert by_key["000000002"] == []
    ignored, stats = detect_faces_node(pool, manifest, index, {"sidecar": "ignore"}, *run_on)
    assert stats["with_sidecar_boxes"] == 0
    assert ignored["face_count"].sum() < replaced["face_count"].sum()
