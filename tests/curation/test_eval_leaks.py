"""Evaluation-set leaks: test images hashed as the pool is, and the pool rows that copy one."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
from conftest import noise_png
from PIL import Image

from aim_kedro.curation.dedup import DedupConfig
from aim_kedro.curation.eval_leaks import EVAL_SCHEMA, eval_index, eval_matches
from aim_kedro.curation.index import INDEX_SCHEMA, IndexConfig, index_sample
from aim_kedro.curation.scoring import ClipScorer
from aim_kedro.io.shards import ShardSet, write_shards


def _probe(tmp_path) -> ShardSet:
    samples = [
        {"__key__": "t0", "png": noise_png(7), "json": {"eval_id": "digits-0007"}},
        {"__key__": "t1", "png": b"not an image"},
        {"__key__": "t2", "png": noise_png(8), "json": {"eval_id": "digits-0008"}},
    ]
    write_shards(samples, str(tmp_path / "probe"), samples_per_shard=2)
    return ShardSet.open(str(tmp_path / "probe"))


def test_eval_index_hashes_every_test_image_and_embeds_when_asked(
    tmp_path, scorer: ClipScorer
) -> None:
    probe = _probe(tmp_path)
    found = eval_index(probe, IndexConfig())
    table, embeddings = found.table, found.embeddings
    assert table.schema == pl.Schema(EVAL_SCHEMA) and embeddings is None
    assert table["eval_id"].to_list() == ["digits-0007", "shard-000000.tar/t1", "digits-0008"]
    assert table["phash"].is_null().to_list() == [False, True, False]
    assert table["sha256_bytes"].null_count() == 0  # undecodable bytes still hash
    embeddings = eval_index(probe, IndexConfig(), scorer).embeddings
    assert embeddings.shape == (3, scorer.embed_dim) and embeddings.dtype == np.float16
    assert not embeddings[1].any() and embeddings[0].any() and embeddings[2].any()


def test_eval_matches_name_the_leaked_image_and_how(tmp_path) -> None:
    evals = eval_index(_probe(tmp_path), IndexConfig())
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(noise_png(8))).convert("RGB").save(jpeg, "JPEG", quality=95)
    rows = [
        index_sample({"__key__": k, "png": data, "txt": "a caption"}, i, "s.tar", IndexConfig())[0]
        for i, (k, data) in enumerate([("copy", noise_png(7)), ("jpeg", jpeg.getvalue()),
                                       ("clean", noise_png(9))])
    ]
    pool = pl.DataFrame(rows, schema=INDEX_SCHEMA)
    found, how = eval_matches(pool, None, evals, DedupConfig(eval_copy_detection=False))
    assert found == ["digits-0007", "digits-0008", None]
    assert how[0] == "same sha256_bytes" and how[1] == "perceptual hash" and how[2] is None
    off = DedupConfig(eval_exact=False, eval_phash_radius=None, eval_crop_phash_radius=None,
                      eval_copy_detection=False)
    assert eval_matches(pool, None, evals, off)[0] == [None, None, None]
