"""Exact, near-duplicate and eval-leak detection, and the choice of each cluster's keeper."""

from __future__ import annotations

import io
import itertools

import numpy as np
import polars as pl
import pytest
from PIL import Image

from aim_kedro.curation.dedup import (
    EVAL_SCHEMA,
    DedupConfig,
    HashArrays,
    UnionFind,
    cosine_pairs,
    deduplicate,
    equal_pairs,
    eval_records,
    hamming_distance,
    hamming_pairs,
    phash_codes,
)
from aim_kedro.curation.index import INDEX_SCHEMA, IndexConfig, index_sample


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


def _no_eval() -> pl.DataFrame:
    return pl.DataFrame(schema=EVAL_SCHEMA)


def test_union_find_merges_transitively() -> None:
    uf = UnionFind(5)
    uf.union(0, 1)
    uf.union(3, 1)
    roots = uf.roots()
    assert roots[0] == roots[1] == roots[3] and len({roots[2], roots[4], roots[0]}) == 3


def test_range_searches_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 60, dtype=np.uint64)
    hashes[10] = hashes[3] ^ np.uint64(0b101)
    i, j, d = hamming_pairs(phash_codes(hashes), 8)
    expected = {
        (a, b) for a, b in itertools.combinations(range(60), 2)
        if hamming_distance(int(hashes[a]), int(hashes[b])) <= 8
    }
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected and (3, 10) in expected
    assert d[list(zip(i, j, strict=True)).index((3, 10))] == 2

    emb = rng.normal(size=(40, 16)).astype(np.float16)
    emb[7] = emb[2] * 3
    i, j, sims = cosine_pairs(emb, 0.99)
    assert (2, 7) in set(zip(i.tolist(), j.tolist(), strict=True)) and sims.min() >= 0.99 - 1e-3
    i, j, _ = cosine_pairs(emb[:5], 0.99, emb[5:])
    assert (2, 2) in set(zip(i.tolist(), j.tolist(), strict=True))


def test_equal_pairs_link_each_group() -> None:
    i, j = equal_pairs(["a", None, "b", "a", None, "a"])
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 3), (0, 5)]


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
    out, summary = deduplicate(pool, None, _no_eval(), None, DedupConfig())
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
    out, _ = deduplicate(pool, None, _no_eval(), None, DedupConfig())
    assert out["dedup_cluster"].to_list() == [None, None]
    loose, _ = deduplicate(pool, None, _no_eval(), None, DedupConfig(max_color_distance=None))
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
    out, summary = deduplicate(pool, None, eval_table, None, DedupConfig())
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
    cfg = DedupConfig(phash_radius=None, crop_phash_radius=None, embedding_threshold=0.99)
    out, _ = deduplicate(pool, emb, _no_eval(), None, cfg)
    assert out["reject_reason"].to_list() == [None, "duplicate", None]
    assert out["dedup_cluster"][2] is None
    assert "embedding cosine" in out["reject_detail"][1]


def test_hash_arrays_read_the_index_columns() -> None:
    pool = _pool([("a", _encode(_picture(1)), 0.5, True)])
    arrays = HashArrays.from_table(pool)
    assert arrays.codes.shape == (1, 8) and arrays.crop_codes.shape == (10, 8)
    assert arrays.crop_owner.tolist() == [0] * 10 and arrays.grids.shape == (1, 48)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="curation.dedup.phash_radius"):
        DedupConfig(phash_radius=65)
    with pytest.raises(ValueError, match="curation.dedup.embedding_threshold"):
        DedupConfig(embedding_threshold=1.5)
    with pytest.raises(ValueError, match="unknown curation.dedup parameter"):
        DedupConfig.from_dict({"radius": 3})
    assert DedupConfig(eval_embedding_threshold=0.9).needs_embeddings
