"""Pairs of matching images: union-find, faiss range searches, equal hashes, hash arrays."""

from __future__ import annotations

import io
import itertools

import faiss
import numpy as np
import polars as pl
from conftest import noise_png

from aim_kedro.curation.index import INDEX_SCHEMA, IndexConfig, index_sample
from aim_kedro.curation.matching import (
    HashArrays,
    UnionFind,
    _range_pairs,
    binary_index,
    color_distance,
    cosine_pairs,
    equal_pairs,
    hamming_distance,
    hamming_pairs,
    hash_pairs,
    multi_hash_layouts,
    phash_codes,
)


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


def _pairs(i: np.ndarray, j: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(i.tolist(), j.tolist(), strict=True))


def test_hamming_range_searches_by_multi_index_hashing_miss_nothing() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.zeros(300, dtype=np.uint64)
    for row in range(300):  # near copies 0-12 bits away, so every radius has pairs at its edge
        for bit in rng.choice(64, int(rng.integers(0, 13)), replace=False):
            flips[row] |= np.uint64(1) << np.uint64(int(bit))
    codes = phash_codes(np.concatenate([base, base ^ flips]))
    bits = np.unpackbits(codes, axis=1).astype(np.int32)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    for radius in (0, 3, 4, 6, 8, 12):
        expected = _pairs(*np.nonzero(distance[:250, 250:] <= radius))
        layouts = multi_hash_layouts(64, radius)
        assert {nflip for _, _, nflip in layouts} == {0, 1, 2}, radius
        for nhash, per_hash, nflip in layouts:
            index = faiss.IndexBinaryMultiHash(64, nhash, per_hash)
            index.nflip = nflip
            index.add(codes[250:])
            i, j, d = _range_pairs(index, codes[:250], radius + 1, self_join=False)
            assert _pairs(i, j) == expected, (radius, nhash, per_hash, nflip)
            assert (d == distance[i, 250 + j]).all()
        i, j, d = hamming_pairs(codes, radius)
        assert _pairs(i, j) == _pairs(*np.nonzero(np.triu(distance <= radius, k=1))), radius


def test_the_index_layout_follows_the_pool_size() -> None:
    assert isinstance(binary_index(64, 4, 100), faiss.IndexBinaryFlat)
    mid, large = binary_index(64, 4, 50_000), binary_index(64, 4, 2_000_000)
    assert isinstance(mid, faiss.IndexBinaryMultiHash) and mid.nflip == 0 and mid.nhash == 5
    # more codes per bucket: fewer, longer blocks looked up with one bit flipped
    assert isinstance(large, faiss.IndexBinaryMultiHash) and large.nflip == 1 and large.nhash == 3


def test_equal_pairs_link_each_group() -> None:
    i, j = equal_pairs(["a", None, "b", "a", None, "a"])
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 3), (0, 5)]


def _hashes(pngs: list[bytes]) -> HashArrays:
    rows = [index_sample({"__key__": f"k{i}", "png": data, "txt": "a caption"}, i, "s.tar",
                         IndexConfig())[0] for i, data in enumerate(pngs)]
    return HashArrays.from_table(pl.DataFrame(rows, schema=INDEX_SCHEMA))


def test_hash_arrays_read_the_index_columns() -> None:
    arrays = _hashes([noise_png(1)])
    assert arrays.codes.shape == (1, 8) and arrays.crop_codes.shape == (10, 8)
    assert arrays.crop_owner.tolist() == [0] * 10 and arrays.grids.shape == (1, 48)


def test_hash_arrays_view_colour_grids_row_by_row_or_leave_them_out() -> None:
    grids = [bytes(range(i, i + 48)) for i in range(3)]
    table = pl.DataFrame({"phash": pl.Series([1, 2, 3], dtype=pl.UInt64),
                          "color_grid": pl.Series(grids, dtype=pl.Binary)})
    arrays = HashArrays.from_table(table)
    assert arrays.grids.dtype == np.uint8 and arrays.grids.shape == (3, 48)
    assert [bytes(row) for row in arrays.grids] == grids
    for broken in ([grids[0], None, grids[2]], [grids[0], grids[1][:12], grids[2]]):
        table = table.with_columns(color_grid=pl.Series(broken, dtype=pl.Binary))
        assert HashArrays.from_table(table).grids is None


def test_hash_pairs_find_crops_and_check_colours() -> None:
    from PIL import Image

    base = Image.open(io.BytesIO(noise_png(0)))
    buffer = io.BytesIO()
    base.crop((3, 3, 64, 64)).resize((64, 64), Image.Resampling.BICUBIC).save(buffer, "PNG")
    pool = _hashes([noise_png(0), buffer.getvalue(), noise_png(1)])
    i, j = hash_pairs(pool, radius=2, crop_radius=None, max_color=None)
    assert (0, 1) not in set(zip(i.tolist(), j.tolist(), strict=True))
    i, j = hash_pairs(pool, radius=2, crop_radius=4, max_color=15.0)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == {(0, 1)}
    assert color_distance(pool.grids[[0]], pool.grids[[0]]).tolist() == [0.0]
