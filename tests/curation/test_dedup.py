"""Duplicate decisions: clusters, eval leaks first, and the total order that picks each keeper."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from aim_kedro.curation.dedup import (
    DedupConfig,
    cluster_ids,
    cluster_keepers,
    dedup_pool,
    deduplicate,
    pool_embeddings,
)
from aim_kedro.curation.eval_leaks import EVAL_SCHEMA, eval_records
from aim_kedro.curation.index import INDEX_SCHEMA, IndexConfig, index_sample
from aim_kedro.curation.matching import hamming_distance


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )


def _row(uid: str, data: bytes, position: int) -> dict:
    row, _ = index_sample(
        {"__key__": uid, "png": data, "txt": "some caption", "json": {"uid": uid}},
        position, "s.tar", IndexConfig(),
    )
    return row


def _pool(entries: list[tuple[str, bytes, float, bool]]) -> pl.DataFrame:
    rows = []
    for position, (uid, data, score, candidate) in enumerate(entries):
        row = _row(uid, data, position)
        rows.append({**row, "clip_score": score, "candidate": candidate})
    schema = {**INDEX_SCHEMA, "clip_score": pl.Float64, "candidate": pl.Boolean}
    return pl.DataFrame(rows, schema=schema).select(
        "uid", "sha256_bytes", "sha256_pixels", "phash", "phash_crops", "color_grid",
        "clip_score", "candidate",
    )


FIRST_PASS = DedupConfig(copy_detection=False, eval_copy_detection=False)
"""The cheap first pass alone (exact hashes, pHash, colour): copy detection is tested in
test_dedup_copies.py."""


def _no_eval() -> pl.DataFrame:
    return pl.DataFrame(schema=EVAL_SCHEMA)


def test_clusters_keep_the_best_surviving_member() -> None:
    base = _picture(0)
    other = _picture(1)
    near = base.resize((80, 80), Image.Resampling.BICUBIC)
    cropped = base.crop((4, 4, 64, 64)).resize((64, 64), Image.Resampling.BICUBIC)
    pool = _pool(
        [
            ("orig", _encode(base), 0.5, True),
            ("bytes", _encode(base), 0.4, True),
            ("pixels", _encode(base, "BMP"), 0.45, True),
            ("near", _encode(near, "JPEG", quality=90), 0.6, True),
            ("crop", _encode(cropped), 0.3, True),
            ("filtered", _encode(base), 0.99, False),
            ("other", _encode(other), 0.2, True),
        ]
    )
    out, summary = deduplicate(pool, None, _no_eval(), None, FIRST_PASS)
    by = {r["uid"]: r for r in out.iter_rows(named=True)}
    cluster = by["orig"]["dedup_cluster"]
    assert cluster is not None and by["other"]["dedup_cluster"] is None
    assert {u for u, r in by.items() if r["dedup_cluster"] == cluster} == {
        "orig", "bytes", "pixels", "near", "crop", "filtered",
    }
    assert by["near"]["reject_reason"] is None  # best score among the survivors
    assert by["filtered"]["reject_reason"] is None  # rejected earlier: never the keeper here
    for uid in ("orig", "bytes", "pixels", "crop"):
        assert by[uid]["reject_reason"] == "duplicate"
        assert by[uid]["reject_detail"].startswith("duplicate of near")
    assert summary["rejected_duplicate"] == 4 and summary["clusters"] == 1


def test_look_alikes_in_other_colours_are_not_duplicates() -> None:
    grey = np.asarray(_picture(0).convert("L"), dtype=np.float32) / 255.0
    red = Image.fromarray((np.stack([grey, grey * 0, grey * 0], -1) * 255).astype(np.uint8))
    blue = Image.fromarray((np.stack([grey * 0, grey * 0, grey], -1) * 255).astype(np.uint8))
    pool = _pool([("red", _encode(red), 0.5, True), ("blue", _encode(blue), 0.4, True)])
    assert hamming_distance(pool["phash"][0], pool["phash"][1]) <= 4
    out, _ = deduplicate(pool, None, _no_eval(), None, FIRST_PASS)
    assert out["dedup_cluster"].to_list() == [None, None]
    loose, _ = deduplicate(pool, None, _no_eval(), None,
                           DedupConfig(copy_detection=False, max_color_distance=None))
    assert loose["reject_reason"].to_list() == [None, "duplicate"]


def test_eval_leaks_are_rejected_before_clustering() -> None:
    test_image = _picture(7)
    samples = [{"__key__": "t0", "png": _encode(test_image), "json": {"eval_id": "digits-0007"}}]
    eval_rows = [row for row, _ in eval_records(samples, IndexConfig())]
    eval_table = pl.DataFrame(eval_rows, schema=EVAL_SCHEMA, orient="row")
    resized = test_image.resize((48, 48), Image.Resampling.BICUBIC)
    pool = _pool(
        [
            ("leak", _encode(test_image.convert("RGB"), "JPEG", quality=95), 0.9, True),
            ("leak_small", _encode(resized), 0.8, True),
            ("clean", _encode(_picture(8)), 0.7, True),
            ("leak_filtered", _encode(test_image), 0.1, False),
        ]
    )
    out, summary = deduplicate(pool, None, eval_table, None, FIRST_PASS)
    assert out["reject_reason"].to_list() == ["eval_leak", "eval_leak", None, None]
    assert out["eval_id"].to_list() == ["digits-0007", "digits-0007", None, "digits-0007"]
    assert "digits-0007" in out["reject_detail"][0]
    assert summary["eval_matches"] == 3 and summary["rejected_eval_leak"] == 2


def test_embedding_rule_and_undecodable_rows() -> None:
    pool = _pool([("a", _encode(_picture(1)), 0.5, True), ("b", _encode(_picture(2)), 0.4, True)])
    broken = pl.DataFrame(
        {"uid": ["c"], "sha256_bytes": [None], "sha256_pixels": [None], "phash": [None],
         "phash_crops": [None], "color_grid": [None], "clip_score": [None], "candidate": [False]},
        schema=pool.schema,
    )
    pool = pl.concat([pool, broken])
    emb = np.array([[1.0, 0.0], [0.999, 0.04], [1.0, 0.0]], dtype=np.float16)
    cfg = DedupConfig(phash_radius=None, crop_phash_radius=None, embedding_threshold=0.99,
                      copy_detection=False)
    out, _ = deduplicate(pool, emb, _no_eval(), None, cfg)
    assert out["reject_reason"].to_list() == [None, "duplicate", None]
    assert out["dedup_cluster"][2] is None
    assert "embedding cosine" in out["reject_detail"][1]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="curation.dedup.phash_radius"):
        DedupConfig(phash_radius=65)
    with pytest.raises(ValueError, match="curation.dedup.embedding_threshold"):
        DedupConfig(embedding_threshold=1.5)
    with pytest.raises(ValueError, match="unknown curation.dedup parameter"):
        DedupConfig.from_dict({"radius": 3})
    assert DedupConfig(eval_embedding_threshold=0.9).needs_embeddings
    with pytest.raises(ValueError, match=r"curation\.dedup\.score_tolerance"):
        DedupConfig(score_tolerance=-1e-4)
    with pytest.raises(ValueError, match=r"'score_tolerence' -> 'score_tolerance'"):
        DedupConfig.from_dict({"score_tolerence": 1e-4})


def test_a_last_bit_change_of_one_score_never_changes_which_copy_is_kept() -> None:
    image = _encode(_picture(3))
    kept = set()
    for first, second in ((0.5, 0.5 + 1e-7), (0.5 + 1e-7, 0.5), (0.5, 0.5 - 1e-7)):
        for order in ((("b", first), ("a", second)), (("a", second), ("b", first))):
            pool = _pool([(uid, image, score, True) for uid, score in order])
            out, _ = deduplicate(pool, None, _no_eval(), None, FIRST_PASS)
            survivors = out.filter(pl.col("reject_reason").is_null())["uid"].to_list()
            assert len(survivors) == 1
            kept.add(survivors[0])
    assert kept == {"a"}  # tied within score_tolerance: the smallest uid, in any row order


def test_keeper_is_the_best_score_beyond_the_tolerance_and_the_smallest_uid_within() -> None:
    cluster = np.array([0, 0, 0, 1, 1, -1])
    uids = ["c", "b", "a", "e", "d", "f"]
    scores = np.array([0.9, 0.80005, 0.8, 0.3, np.nan, 0.99])
    eligible = np.array([True, True, True, True, True, False])
    assert cluster_keepers(cluster, scores, uids, eligible, 1e-4) == {0: 0, 1: 3}
    eligible[0] = False  # the best is out of the running: b and a tie, a wins
    assert cluster_keepers(cluster, scores, uids, eligible, 1e-4) == {0: 2, 1: 3}
    assert cluster_keepers(cluster, scores, uids, eligible, 0.0) == {0: 1, 1: 3}
    nan = np.array([np.nan] * 6)
    assert cluster_keepers(cluster, nan, uids, eligible, 1e-4) == {0: 2, 1: 4}


def test_cluster_ids_follow_each_cluster_s_first_row() -> None:
    roots = np.array([7, 2, 7, 5, 2, 9])
    in_cluster = np.array([True, True, True, False, True, False])
    assert cluster_ids(roots, in_cluster).tolist() == [0, 1, 0, -1, 1, -1]
    assert cluster_ids(roots, np.zeros(6, dtype=bool)).tolist() == [-1] * 6
    assert cluster_ids(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)).tolist() == []


def test_dedup_pool_joins_scores_and_candidates_in_index_order() -> None:
    index = pl.DataFrame(
        [_row(uid, _encode(_picture(i)), i) for i, uid in enumerate(["x", "y", "z"])],
        schema=INDEX_SCHEMA,
    ).with_columns(reject_reason=pl.Series([None, None, "corrupt"], dtype=pl.String))
    scores = pl.DataFrame({"uid": ["y", "x"], "clip_score": [0.2, 0.1]})
    decisions = pl.DataFrame({"uid": ["x", "y", "z"], "reject_reason": [None, "nsfw", None]},
                             schema={"uid": pl.String, "reject_reason": pl.String})
    pool = dedup_pool(index, scores, decisions)
    assert pool["uid"].to_list() == ["x", "y", "z"]
    assert pool["clip_score"].to_list() == [0.1, 0.2, None]
    assert pool["candidate"].to_list() == [True, False, False]
    embeddings = pl.DataFrame({"uid": ["z", "x"], "image_emb": [[0.0, 1.0], [1.0, 0.0]]},
                              schema={"uid": pl.String, "image_emb": pl.Array(pl.Float16, 2)})
    aligned = pool_embeddings(pool, embeddings)
    assert aligned.dtype == np.float16
    assert aligned.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
