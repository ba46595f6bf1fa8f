"""The scoring pass over a pool: shard by shard, resumable from its cache, on an executor."""

from __future__ import annotations

import functools

import numpy as np
import polars as pl
import pytest
from conftest import CAPTIONS, png_bytes
from PIL import Image

from aim_kedro.curation import pool_scoring
from aim_kedro.curation.clip_models import load_clip_model
from aim_kedro.curation.executors import LocalExecutor
from aim_kedro.curation.index import IndexConfig, build_index, decode_selected
from aim_kedro.curation.pool_scoring import score_index, score_tables
from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.curation.scoring import SCORE_FIELDS, ClipScorer, score_shard
from aim_kedro.io.shards import ShardSet, write_shards


def _indexed_pool(root, images: list[Image.Image]) -> tuple[ShardSet, pl.DataFrame]:
    samples = [
        {"__key__": f"{i:03d}", "png": png_bytes(images[i % len(images)]), "txt": CAPTIONS[i % 5],
         "json": {"uid": f"{i:032x}"}}
        for i in range(9)
    ]
    write_shards(samples, str(root), samples_per_shard=3)
    shards = ShardSet.open(str(root))
    index, _ = build_index(shards, IndexConfig(), progress=False)
    return shards, index


def _counts(summary: dict) -> dict:
    return {k: summary[k] for k in ("shards", "scored_shards", "resumed_shards")}


def test_score_index_resumes_from_finished_shards(
    tmp_path, monkeypatch, checkpoint: dict, scorer: ClipScorer, images: list[Image.Image]
) -> None:
    shards, index = _indexed_pool(tmp_path / "pool", images)
    cache = ShardResultCache(str(tmp_path / "cache"))
    loader = functools.partial(lambda: scorer)
    full, summary = score_index(loader, shards, index, IndexConfig(), 2, cache=cache,
                                progress=False)
    assert _counts(summary) == {"shards": 3, "scored_shards": 3, "resumed_shards": 0}
    assert summary["model"] == "tiny-test-clip" and summary["executor"] == "local"
    assert full["uid"].tolist() == index["uid"].to_list()
    entries = cache.keys("clip_score")
    assert len(entries) == 3
    # a run killed after two shards: the third entry was never written
    (tmp_path / "cache" / f"{entries[-1]}.npz").unlink()
    scored = []
    monkeypatch.setattr(
        pool_scoring, "score_shard",
        lambda *args, **kwargs: scored.append(len(args[1])) or score_shard(*args, **kwargs),
    )
    resumed, summary = score_index(loader, shards, index, IndexConfig(), 2, cache=cache,
                                   progress=False)
    assert _counts(summary) == {"shards": 3, "scored_shards": 1, "resumed_shards": 2}
    assert scored == [2, 1]  # the one missing shard of 3 rows, in batches of 2
    for name in SCORE_FIELDS:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)
    assert resumed["uid"].dtype == object
    # another model (or batch size) never reuses these entries
    other = {**checkpoint, "state_dict": {k: v + 0.01 for k, v in checkpoint["state_dict"].items()}}
    other_scorer = load_clip_model("", checkpoint=other, device="cpu", batch_size=3)
    _, summary = score_index(lambda: other_scorer, shards, index, IndexConfig(), 2, cache=cache,
                             progress=False)
    assert summary["resumed_shards"] == 0
    _, summary = score_index(loader, shards, index, IndexConfig(), 4, cache=cache, progress=False)
    assert summary["resumed_shards"] == 0


def test_each_shard_is_scored_as_score_shard_scores_it(
    tmp_path, scorer: ClipScorer, images: list[Image.Image]
) -> None:
    shards, index = _indexed_pool(tmp_path / "pool", images)
    out, summary = score_index(lambda: scorer, shards, index, IndexConfig(), 2, progress=False)
    assert summary["scoring_batch_size"] == 2 and summary["scored_shards"] == 3
    first = index.filter(pl.col("shard") == index["shard"][0])
    records = [(row["uid"], image, row["caption"])
               for row, image in decode_selected(shards, first, IndexConfig())]
    direct = score_shard(scorer, records, 2, progress=False)
    for name in SCORE_FIELDS:
        np.testing.assert_array_equal(out[name][: first.height], direct[name], err_msg=name)


def test_the_model_is_built_once_per_pass(tmp_path, scorer: ClipScorer, images) -> None:
    shards, index = _indexed_pool(tmp_path / "pool", images)
    built = []

    def make() -> ClipScorer:
        built.append(1)
        return scorer

    cache = ShardResultCache(str(tmp_path / "cache"))
    score_index(make, shards, index, IndexConfig(), 2, cache=cache, executor=LocalExecutor(False))
    assert built == [1]
    _, summary = score_index(make, shards, index.clear(), IndexConfig(), 2, progress=False)
    assert summary["shards"] == 0 and summary["model"] == "tiny-test-clip"


def test_score_tables_have_the_catalog_types(tmp_path, scorer: ClipScorer, images) -> None:
    shards, index = _indexed_pool(tmp_path / "pool", images)
    out, _ = score_index(lambda: scorer, shards, index, IndexConfig(), 4, progress=False)
    scores, embeddings = score_tables(out)
    assert scores.columns == ["uid", "clip_score", "nsfw_score"]
    assert scores["clip_score"].dtype == pl.Float32 and scores.height == index.height
    assert embeddings["image_emb"].dtype == pl.Array(pl.Float16, 32)
    assert embeddings["uid"].to_list() == index["uid"].to_list()


def test_precomputed_scores_come_from_the_sidecar_column() -> None:
    index = pl.DataFrame({
        "uid": ["a", "b", "c", "d"], "reject_reason": [None, None, "corrupt", None],
        "clip_l14_similarity_score": [0.31, None, 0.2, 0.12],
    })
    scores, embeddings = pool_scoring.precomputed_scores(index, "clip_l14_similarity_score")
    assert scores["uid"].to_list() == ["a", "b", "d"]
    got = scores["clip_score"].to_list()
    assert np.isclose(got[0], 0.31) and np.isnan(got[1]) and np.isclose(got[2], 0.12)
    assert scores["nsfw_score"].is_nan().all() and embeddings.height == 3
    with pytest.raises(ValueError, match="score_column='missing' is not a column of pool_index"):
        pool_scoring.precomputed_scores(index, "missing")
