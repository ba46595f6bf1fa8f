"""Faces of the kept rows, the subset stream, and the check of the written subset."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pytest
from conftest import noise_png
from PIL import Image

from aim_kedro.curation.face_stage import FACE_SCHEMA, detect_faces
from aim_kedro.curation.faces import make_detector
from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.curation.manifest import dfn_manifest
from aim_kedro.curation.subset import SubsetConfig, check_subset, iter_subset
from aim_kedro.io.shards import ShardSet, write_shards

CFG = SubsetConfig(shorter_side=24, image_format="png")


class CornerDetector:
    """Finds one 'face' in the top-left corner of every image (a detector of known output)."""

    def detect(self, image: Image.Image) -> list[tuple[int, int, int, int]]:
        return [(0, 0, image.width // 4, image.height // 4)]


@pytest.fixture
def pool(tmp_path: Path) -> tuple[ShardSet, pl.DataFrame]:
    samples = [{"__key__": f"k{i}", "png": noise_png(i, 48), "txt": f"picture {i}",
                "json": {"uid": f"u{i}"}} for i in range(5)]
    samples[3]["png"] = b"broken"
    write_shards(samples, str(tmp_path / "pool"), samples_per_shard=2)
    shards = ShardSet.open(str(tmp_path / "pool"))
    index, _ = build_index(shards, IndexConfig(), progress=False)
    return shards, index


def _rows(index: pl.DataFrame, faces: pl.DataFrame) -> pl.DataFrame:
    return index.select("uid", "shard", "key", "position", "caption").join(
        faces, on="uid", how="left", maintain_order="left"
    ).with_columns(clip_score=pl.lit(0.5), nsfw_score=pl.lit(0.1),
                   dedup_cluster=pl.lit(None, dtype=pl.Int64),
                   boxes=pl.col("boxes").fill_null(pl.lit([], dtype=pl.List(pl.List(pl.Int32)))),
                   face_count=pl.col("face_count").fill_null(0))


def test_faces_of_every_row_in_pool_order(pool) -> None:
    shards, index = pool
    rows = index.select("uid", "shard", "key", "position").reverse()
    faces, summary = detect_faces(CornerDetector(), shards, rows, IndexConfig(), progress=False)
    assert faces.schema == pl.Schema(FACE_SCHEMA)
    assert faces["uid"].to_list() == ["u0", "u1", "u2", "u3", "u4"]
    assert faces["face_count"].to_list() == [1, 1, 1, 0, 1]  # u3 no longer decodes
    assert faces["boxes"][0].to_list() == [[0, 0, 12, 12]]
    assert summary["images"] == 5 and summary["faces"] == 4 and summary["undecodable"] == 1
    assert summary["executor"] == "local"
    none, _ = detect_faces(make_detector("none"), shards, rows.head(0), IndexConfig(),
                           progress=False)
    assert none.height == 0 and none.schema == pl.Schema(FACE_SCHEMA)


def test_subset_streams_blurred_resized_samples_and_the_check_counts_them(pool, tmp_path) -> None:
    shards, index = pool
    faces, _ = detect_faces(CornerDetector(), shards, index, IndexConfig(), progress=False)
    none = pl.lit([], dtype=pl.List(pl.List(pl.Int32)))
    faces = faces.with_columns(  # no face in u1; a face in u3, whose image no longer decodes
        face_count=pl.when(pl.col("uid") == "u1").then(0).when(pl.col("uid") == "u3").then(1)
        .otherwise("face_count"),
        boxes=pl.when(pl.col("uid") == "u1").then(none).when(pl.col("uid") == "u3")
        .then(pl.lit([[0, 0, 4, 4]], dtype=pl.List(pl.List(pl.Int32)))).otherwise("boxes"))
    rows = _rows(index.filter(pl.col("uid") != "u4"), faces)
    stream = iter_subset(shards, rows, CFG, IndexConfig(), progress=False)
    write_shards(stream, str(tmp_path / "subset"), samples_per_shard=2)
    subset = ShardSet.open(str(tmp_path / "subset"))
    samples = list(subset)
    assert [s["__key__"] for s in samples] == ["u0", "u1", "u2"]  # u3 is undecodable: skipped
    assert min(Image.open(io.BytesIO(samples[0]["png"])).size) == 24
    stats = check_subset(subset, dfn_manifest(rows), CFG)
    assert {k: stats[k] for k in ("kept", "with_faces", "written", "images_blurred",
                                  "undecodable")} == {
        "kept": 4, "with_faces": 3, "written": 3, "images_blurred": 2, "undecodable": 1}
    assert stats["shorter_side"] == 24 and stats["image_format"] == "png"


def test_check_refuses_a_subset_that_does_not_match_its_manifest(pool, tmp_path) -> None:
    shards, index = pool
    faces, _ = detect_faces(make_detector("none"), shards, index, IndexConfig(), progress=False)
    rows = _rows(index.filter(pl.col("uid") != "u3"), faces)
    samples = list(iter_subset(shards, rows, CFG, IndexConfig(), progress=False))
    manifest = dfn_manifest(rows)
    with pytest.raises(AssertionError, match="holds u0, which dfn_manifest does not list"):
        check_subset(samples, manifest.filter(pl.col("uid") != "u0"), CFG)
    with pytest.raises(AssertionError, match="holds u1 twice"):
        check_subset(samples + samples[1:2], manifest, CFG)
    with pytest.raises(AssertionError, match="shorter side of 24 px, not .*shorter_side=32"):
        check_subset(samples, manifest, SubsetConfig(shorter_side=32, image_format="png"))
    with pytest.raises(AssertionError, match=r"has no \.jpg image"):
        check_subset(samples, manifest, SubsetConfig(shorter_side=24, image_format="jpg"))
    bigger_only = SubsetConfig(shorter_side=32, image_format="png", only_if_bigger=True)
    assert check_subset(samples, manifest, bigger_only)["written"] == 4
