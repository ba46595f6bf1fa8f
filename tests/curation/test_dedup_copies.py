"""Dedup with copy detection: descriptor candidates and colour-disagreeing pHash matches are
verified, copies join their source's cluster with the kind of match named, distinct images stay
apart, and the same machinery finds leaks of every evaluation set."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from conftest import scene_picture
from kedro.io.core import DatasetError
from PIL import Image, ImageEnhance

from aim_kedro.curation.dedup import DedupConfig, deduplicate
from aim_kedro.curation.eval_leaks import EVAL_SCHEMA, eval_index, eval_loader
from aim_kedro.curation.index import INDEX_SCHEMA, IndexConfig, index_sample
from aim_kedro.curation.report import dedup_clusters
from aim_kedro.datasets import EvalSetsDataset
from aim_kedro.io.shards import write_shards

CFG = DedupConfig(copy_detection=True, verify={"min_coverage": 0.0, "min_correlation": 0.5})
"""Copy detection on the pool and the evaluation sets, with conf/base's real-pool values."""


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _pool(images: dict[str, Image.Image]) -> pl.DataFrame:
    rows = []
    for position, (uid, image) in enumerate(images.items()):
        row, _ = index_sample({"__key__": uid, "png": _png(image), "txt": "a caption",
                               "json": {"uid": uid}}, position, "s.tar", IndexConfig())
        rows.append({**row, "clip_score": 0.5 - position / 100, "candidate": True})
    schema = {**INDEX_SCHEMA, "clip_score": pl.Float64, "candidate": pl.Boolean}
    return pl.DataFrame(rows, schema=schema)


def _loader(images: list[Image.Image]):
    def load(rows):
        for row in rows:
            yield row, images[row]
    return load


def _letterbox(image: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (image.width, image.height * 3 // 2))
    canvas.paste(image, (0, image.height // 4))
    return canvas


def _same_descriptors(n: int) -> np.ndarray:
    """One descriptor for every image: every pair is a candidate, verification decides."""
    return np.ones((n, 8), np.float32)


def test_copies_the_cheap_pass_misses_join_their_source() -> None:
    original = scene_picture(1)
    images = {
        "orig": original,
        "grey": original.convert("L").convert("RGB"),
        "brighter": ImageEnhance.Brightness(original).enhance(1.25),
        "letterbox": _letterbox(original),
        "crop": original.crop((0, 0, 230, 230)),
        "other": scene_picture(2),
        "third": scene_picture(3),
    }
    pool = _pool(images)
    first, _ = deduplicate(pool, None, pl.DataFrame(schema=EVAL_SCHEMA), None,
                           DedupConfig(copy_detection=False))
    assert first.filter(pl.col("uid") == "letterbox")["dedup_cluster"][0] is None  # the gap
    out, summary = deduplicate(
        pool, None, pl.DataFrame(schema=EVAL_SCHEMA), None, CFG,
        descriptors=_same_descriptors(pool.height), images=_loader(list(images.values())),
    )
    by = {r["uid"]: r for r in out.iter_rows(named=True)}
    cluster = by["orig"]["dedup_cluster"]
    assert cluster is not None
    for uid in ("grey", "brighter", "letterbox", "crop"):
        assert by[uid]["dedup_cluster"] == cluster and by[uid]["reject_reason"] == "duplicate", uid
    assert by["orig"]["reject_reason"] is None  # the best clip_score
    assert by["other"]["dedup_cluster"] is None and by["third"]["dedup_cluster"] is None
    assert by["letterbox"]["match_kind"].startswith("copy detection")
    assert by["grey"]["match_kind"] in ("perceptual hash", "copy detection: local features")
    kinds = dedup_clusters(summary)
    assert kinds["clusters"] == 1 and any(k.startswith("copy detection") for k in kinds["by_kind"])
    assert kinds["largest"][0]["size"] == 5
    pool_stats = summary["copy_detection"]["pool"]
    assert pool_stats["pairs_verified"] + pool_stats["pairs_skipped_already_joined"] >= 4


def test_copy_detection_needs_its_inputs() -> None:
    pool = _pool({"a": scene_picture(1)})
    with pytest.raises(ValueError, match="copy_descriptors"):
        deduplicate(pool, None, pl.DataFrame(schema=EVAL_SCHEMA), None, CFG)
    evals = eval_index({"one": [("k", _png(scene_picture(1)), 0)]}, IndexConfig()).table
    with pytest.raises(ValueError, match="eval_copy_detection needs"):
        deduplicate(pool, None, evals, None, DedupConfig())  # conf/base: eval copy detection
    with pytest.raises(ValueError, match=r"curation\.dedup\.eval_copy_detection must be true"):
        DedupConfig(eval_copy_detection="yes")


def test_leaks_of_an_image_folder_and_of_shards_are_found(tmp_path) -> None:
    test_a, test_b = scene_picture(10), scene_picture(11)
    folder = tmp_path / "folder" / "cats"
    folder.mkdir(parents=True)
    test_a.save(folder / "a.png")
    write_shards([{"__key__": "b", "png": _png(test_b), "cls": "0"}], str(tmp_path / "shards"),
                 samples_per_shard=4)
    sets = EvalSetsDataset(sets={"folder_set": {"kind": "image_folder", "path": str(tmp_path / "folder")},
                                 "shard_set": {"kind": "shards", "path": str(tmp_path / "shards")}}).load()
    evals = eval_index(sets, IndexConfig())
    assert evals.table["eval_id"].to_list() == ["folder_set/cats/a.png", "shard-000000.tar/b"]
    images = {"boxed": _letterbox(test_a), "grey": test_b.convert("L").convert("RGB"),
              "clean": scene_picture(12)}
    pool = _pool(images)
    out, summary = deduplicate(
        pool, None, evals.table, None, CFG, descriptors=_same_descriptors(3),
        eval_descriptors=_same_descriptors(2), images=_loader(list(images.values())),
        eval_images=eval_loader(sets, IndexConfig()),
    )
    by = {r["uid"]: r for r in out.iter_rows(named=True)}
    assert by["boxed"]["reject_reason"] == "eval_leak"
    assert by["boxed"]["eval_id"] == "folder_set/cats/a.png"
    assert by["grey"]["reject_reason"] == "eval_leak" and by["grey"]["eval_id"] == "shard-000000.tar/b"
    assert by["clean"]["reject_reason"] is None
    assert summary["eval_matches"] == 2 and summary["copy_detection"]["eval"]["pairs_verified"] >= 1


def test_eval_sets_dataset_checks_its_entries(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"eval_leak_sets\.sets\.bad"):
        EvalSetsDataset(sets={"bad": {"kind": "folder", "path": "x"}})
    with pytest.raises(DatasetError, match=r"eval_leak_sets\.sets\.gone: shard folder .* does not exist"):
        EvalSetsDataset(sets={"gone": {"kind": "shards", "path": str(tmp_path / "none")}}).load()
    assert EvalSetsDataset().load() == {}
    with pytest.raises(DatasetError, match="read-only"):
        EvalSetsDataset().save({})
