"""Pairs of matching images over compact per-sample arrays: equal hashes, near pHashes, close
embeddings, and the candidate pairs of copy-detection descriptors.

Perceptual hashes within a Hamming radius come from exact faiss range searches by multi-index
hashing (``binary_index``; a crop hash of one image against the pHash of the other catches
cropped copies), image embeddings whose cosine reaches a threshold from ``IndexFlatIP``;
colour grids then confirm pHash matches. ``knn_pairs`` proposes copy candidates: each
descriptor's nearest neighbours (exact below a size threshold, an IVF or HNSW index above) that
stand out from its neighbourhood. ``UnionFind`` merges matched pairs into clusters. Used by ``dedup`` (pool against
itself) and ``eval_leaks`` (pool against the evaluation test set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import polars as pl

QUERY_CHUNK = 4096


@dataclass
class HashArrays:
    """The compact per-image arrays that dedup compares: pHash codes, crop hashes, colour grids.

    ``codes`` is ``[N, 8]`` uint8 (the 64-bit pHash), ``crop_codes`` ``[M, 8]`` with
    ``crop_owner[m]`` the row each crop hash belongs to, ``grids`` ``[N, G]`` uint8 (or None).
    """

    codes: np.ndarray
    crop_codes: np.ndarray
    crop_owner: np.ndarray
    grids: np.ndarray | None

    @classmethod
    def from_table(cls, table: pl.DataFrame) -> HashArrays:
        """From a table with ``phash`` and optional ``phash_crops`` and ``color_grid`` columns;
        every row must have a phash (filter undecodable rows out first)."""
        codes = phash_codes(table["phash"].cast(pl.UInt64).to_numpy())
        crop_codes = np.zeros((0, 8), dtype=np.uint8)
        crop_owner = np.zeros(0, dtype=np.int32)  # int32: ten per image, half of int64's bytes
        if "phash_crops" in table.columns and table.height:
            # columnar (no Python object per hash): a pool holds ten crop hashes per image
            crops = table["phash_crops"].cast(pl.List(pl.UInt64)).list.drop_nulls()
            counts = crops.list.len().fill_null(0).to_numpy().astype(np.int64)
            if counts.sum():
                crop_codes = phash_codes(crops.explode().drop_nulls().to_numpy())
                crop_owner = np.repeat(np.arange(len(crops), dtype=np.int32), counts)
        grids = None
        if "color_grid" in table.columns and table.height:
            column = table["color_grid"]
            widths = column.bin.size()
            width = int(widths.max() or 0)
            if width and column.null_count() == 0 and widths.min() == width:
                # columnar too: the bytes viewed as [N, width], no Python bytes per row
                grids = column.bin.reinterpret(dtype=pl.Array(pl.UInt8, width)).to_numpy()
        return cls(codes=codes, crop_codes=crop_codes, crop_owner=crop_owner, grids=grids)

    def __len__(self) -> int:
        return len(self.codes)


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, i: int) -> int:
        """The root of ``i``'s set."""
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return int(i)

    def connected(self, a: int, b: int) -> bool:
        """Whether ``a`` and ``b`` are in one set."""
        return self.find(a) == self.find(b)

    def union(self, a: int, b: int) -> None:
        """Merge the sets of ``a`` and ``b``."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def roots(self) -> np.ndarray:
        """The root of every element."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def phash_codes(phashes: np.ndarray) -> np.ndarray:
    """64-bit hashes as ``[N, 8]`` uint8 codes for faiss binary indexes."""
    values = np.ascontiguousarray(np.asarray(phashes, dtype=np.uint64))
    return values.astype(">u8").view(np.uint8).reshape(-1, 8)


def hamming_distance(a: int, b: int) -> int:
    """Bits in which two 64-bit hashes differ."""
    return int(bin(int(a) ^ int(b)).count("1"))


def _range_pairs(
    index: Any, queries: np.ndarray, radius: float, self_join: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run a faiss range search in chunks; return query ids, hit ids and distances/similarities."""
    rows, cols, values = [], [], []
    for start in range(0, len(queries), QUERY_CHUNK):
        lims, dist, ids = index.range_search(queries[start : start + QUERY_CHUNK], radius)
        counts = np.diff(lims.astype(np.int64))
        q = np.repeat(np.arange(start, start + len(counts)), counts)
        rows.append(q)
        cols.append(ids.astype(np.int64))
        values.append(dist)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    q, h, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(values)
    if self_join:
        keep = q < h
        q, h, v = q[keep], h[keep], v[keep]
    return q, h, v


def hamming_pairs(
    codes: np.ndarray, radius: int, others: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, bits)`` of codes within ``radius`` bits: inside ``codes`` (i < j) or from
    ``codes`` (i) to ``others`` (j)."""
    base = codes if others is None else others
    if len(codes) == 0 or len(base) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    index = binary_index(codes.shape[1] * 8, int(radius), len(base))
    index.add(np.ascontiguousarray(base))
    return _range_pairs(index, np.ascontiguousarray(codes), int(radius) + 1, others is None)


# Relative costs per query, from range searches of 2M random 64-bit codes against 200k with
# faiss 1.15 on 2 CPU cores: a hash-table lookup is the unit, checking a code found in a bucket
# costs 0.75, a flat scan 0.01 per code.
CHECK_COST = 0.75
FLAT_COST = 0.01


def multi_hash_layouts(bits: int, radius: int) -> list[tuple[int, int, int]]:
    """The exact multi-index hashing layouts ``(nhash, bits_per_hash, nflip)`` for range
    searches of ``radius`` bits: ``nhash`` disjoint blocks, each looked up with up to ``nflip``
    bits flipped. Codes within ``radius`` bits differ in at most ``nflip`` bits of some block
    whenever ``nhash * (nflip + 1) > radius`` (pigeonhole), so nothing within the radius is
    missed."""
    layouts = []
    for nflip in (0, 1, 2):
        nhash = radius // (nflip + 1) + 1
        per_hash = min(bits // nhash, 32)
        if per_hash >= 4:
            layouts.append((nhash, per_hash, nflip))
    return layouts


def binary_index(bits: int, radius: int, size: int) -> Any:
    """The cheapest exact faiss index for Hamming range searches of ``radius`` bits over
    ``size`` codes of ``bits`` bits: ``IndexBinaryMultiHash`` in the layout of
    ``multi_hash_layouts`` with the fewest lookups and bucket checks per query (each query
    checks only the codes sharing a block, not every code), or the flat scan for small sets."""
    best, cost = None, FLAT_COST * size
    for nhash, per_hash, nflip in multi_hash_layouts(bits, radius):
        probes = sum(math.comb(per_hash, k) for k in range(nflip + 1))
        layout_cost = nhash * probes * (1.0 + CHECK_COST * size / 2.0**per_hash)
        if layout_cost < cost:
            best, cost = (nhash, per_hash, nflip), layout_cost
    if best is None:
        return faiss.IndexBinaryFlat(bits)
    index = faiss.IndexBinaryMultiHash(bits, best[0], best[1])
    index.nflip = best[2]
    return index


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """float16/float32 embeddings as L2-normalised contiguous float32 (zero rows stay zero)."""
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def cosine_pairs(
    embeddings: np.ndarray, threshold: float, others: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, cosine)`` with cosine >= ``threshold``, like ``hamming_pairs``."""
    x = normalized(embeddings)
    base = x if others is None else normalized(others)
    if len(x) == 0 or len(base) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(base)
    return _range_pairs(index, x, float(threshold) - 1e-6, others is None)


def equal_pairs(values: Sequence[str | None] | pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of positions holding the same non-null value (each linked to the group's first),
    in position order; columnar, so a pool's hash column is never turned into Python strings."""
    column = values if isinstance(values, pl.Series) else pl.Series(list(values), dtype=pl.String)
    frame = (
        pl.DataFrame({"value": column}).with_row_index("row")
        .filter(pl.col("value").is_not_null())
        .with_columns(first=pl.col("row").min().over("value"))
        .filter(pl.col("row") != pl.col("first"))
    )
    return frame["first"].to_numpy().astype(np.int64), frame["row"].to_numpy().astype(np.int64)


def color_distance(grids_a: np.ndarray, grids_b: np.ndarray) -> np.ndarray:
    """Row-wise RMS distance of colour grids (0-255 scale)."""
    diff = grids_a.astype(np.float32) - grids_b.astype(np.float32)
    return np.sqrt((diff * diff).mean(axis=1))


def _unique_pairs(i: np.ndarray, j: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    if symmetric:
        i, j = np.minimum(i, j), np.maximum(i, j)
        keep = i != j
        i, j = i[keep], j[keep]
    if not len(i):
        return i.astype(np.int64), j.astype(np.int64)
    pairs = np.unique(np.stack([i, j], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def hash_pairs(
    a: HashArrays,
    radius: int | None,
    crop_radius: int | None,
    max_color: float | None,
    b: HashArrays | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs matched by perceptual hashes: inside ``a`` (i < j) or from ``a`` (i) to ``b`` (j).

    A pair matches when the pHashes are within ``radius`` bits, or a crop hash of either is
    within ``crop_radius`` bits of the other's pHash; then, if ``max_color`` is set, the colour
    grids must be within that RMS distance.
    """
    i, j = hash_candidates(a, radius, crop_radius, b)
    keep = colour_agrees(a, i, j, max_color, b)
    return i[keep], j[keep]


def colour_agrees(
    a: HashArrays, i: np.ndarray, j: np.ndarray, max_color: float | None, b: HashArrays | None = None
) -> np.ndarray:
    """Which pairs ``(i, j)`` (of ``a``, or ``a`` to ``b``) have colour grids within
    ``max_color`` RMS (all, without grids or a limit)."""
    other = a if b is None else b
    if max_color is None or a.grids is None or other.grids is None or not len(i):
        return np.ones(len(i), dtype=bool)
    return color_distance(a.grids[i], other.grids[j]) <= float(max_color) + 1e-6


def hash_candidates(
    a: HashArrays,
    radius: int | None,
    crop_radius: int | None,
    b: HashArrays | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The pHash (or crop-hash) matches of ``hash_pairs`` before the colour check."""
    symmetric = b is None
    other = a if b is None else b
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    if radius is not None:
        i, j, _ = hamming_pairs(a.codes, radius, None if symmetric else other.codes)
        rows.append(i)
        cols.append(j)
    if crop_radius is not None:
        if len(a.crop_codes):
            i, j, _ = hamming_pairs(a.crop_codes, crop_radius, other.codes)
            rows.append(a.crop_owner[i])
            cols.append(j)
        if not symmetric and len(other.crop_codes):
            i, j, _ = hamming_pairs(other.crop_codes, crop_radius, a.codes)
            rows.append(j)
            cols.append(other.crop_owner[i])
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return _unique_pairs(np.concatenate(rows), np.concatenate(cols), symmetric)


ANN_KINDS = ("ivf", "hnsw")


@dataclass(frozen=True)
class CandidateConfig:
    """Which descriptor neighbours become candidate pairs (``curation.dedup.candidates``).

    Each image's ``k`` nearest neighbours by cosine are candidates when the cosine is at least
    ``min_similarity`` and exceeds the image's background (its cosine to its
    ``background_rank``-th neighbour: how crowded its neighbourhood is) by ``margin``, or when
    it reaches ``accept_similarity`` whatever the background. Up to ``exact_below`` images
    are searched exactly (faiss ``IndexFlatIP``); above, with an ANN index (``ann``: ``ivf``
    with ``nlist`` lists (null: 4 sqrt(N)) and ``nprobe`` probed, or ``hnsw`` with ``hnsw_m``
    links and ``ef_search``), whose memory is the descriptors plus the links.
    """

    k: int = 10
    min_similarity: float = 0.5
    margin: float = 0.03
    background_rank: int = 10
    accept_similarity: float = 0.98
    exact_below: int = 200_000
    ann: str = "ivf"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 64

    def __post_init__(self) -> None:
        where = "curation.dedup.candidates"
        for name, low in (("k", 1), ("background_rank", 1), ("exact_below", 0), ("nprobe", 1),
                          ("hnsw_m", 4), ("ef_search", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{name} must be an integer >= {low}, got {value!r}")
        if self.background_rank > self.k:
            raise ValueError(
                f"{where}.background_rank ({self.background_rank}) must be <= {where}.k "
                f"({self.k}): the background is one of the k neighbours"
            )
        for name in ("min_similarity", "accept_similarity"):
            if not -1.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{where}.{name} must be a cosine in [-1, 1], got {getattr(self, name)!r}")
        if not float(self.margin) >= 0.0:
            raise ValueError(f"{where}.margin must be >= 0, got {self.margin!r}")
        if self.ann not in ANN_KINDS:
            raise ValueError(f"{where}.ann must be one of {list(ANN_KINDS)}, got {self.ann!r}")
        if self.nlist is not None and (isinstance(self.nlist, bool) or not isinstance(self.nlist, int)
                                       or self.nlist < 1):
            raise ValueError(f"{where}.nlist must be >= 1 or null (4 sqrt(N)), got {self.nlist!r}")


def neighbour_index(base: np.ndarray, cfg: CandidateConfig) -> Any:
    """A faiss inner-product index over ``base`` (L2-normalised float32): exact up to
    ``cfg.exact_below`` vectors, else IVF-Flat or HNSW."""
    n, dim = base.shape
    if n <= cfg.exact_below:
        index = faiss.IndexFlatIP(dim)
    elif cfg.ann == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(cfg.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = int(cfg.ef_search)
    else:
        nlist = int(cfg.nlist or max(1, round(4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = base[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)]
        index.train(np.ascontiguousarray(sample))
        index.nprobe = int(cfg.nprobe)
    index.add(base)
    return index


def knn_pairs(
    descriptors: np.ndarray, cfg: CandidateConfig, others: np.ndarray | None = None,
    index: Any | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs ``(i, j, cosine)`` by the rule of ``CandidateConfig``: inside
    ``descriptors`` (i < j, each pair once) or from ``descriptors`` (i) to ``others`` (j).
    Queries run in chunks, so memory holds the index, one chunk's neighbours and the pairs."""
    x = normalized(descriptors)
    base = x if others is None else normalized(others)
    if len(x) == 0 or len(base) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = index if index is not None else neighbour_index(base, cfg)
    self_join = others is None
    k = min(int(cfg.k) + int(self_join), len(base))
    rank = min(int(cfg.background_rank) - 1 + int(self_join), k - 1)
    rows, cols, sims = [], [], []
    for start in range(0, len(x), QUERY_CHUNK):
        sim, ids = index.search(x[start : start + QUERY_CHUNK], k)
        query = np.arange(start, start + len(ids))[:, None]
        background = sim[:, rank : rank + 1] if k > rank else np.full((len(ids), 1), -1.0)
        ok = (ids >= 0) & (sim >= float(cfg.min_similarity)) & (
            (sim - background >= float(cfg.margin)) | (sim >= float(cfg.accept_similarity)))
        if self_join:
            ok &= ids != query
        q, c = np.nonzero(ok)
        rows.append(query[q, 0])
        cols.append(ids[q, c].astype(np.int64))
        sims.append(sim[q, c])
    i, j, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)
    if self_join:
        i, j = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], s[first]


__all__ = [
    "ANN_KINDS",
    "CandidateConfig",
    "HashArrays",
    "UnionFind",
    "color_distance",
    "colour_agrees",
    "cosine_pairs",
    "equal_pairs",
    "hamming_distance",
    "hamming_pairs",
    "hash_candidates",
    "hash_pairs",
    "knn_pairs",
    "neighbour_index",
    "normalized",
    "phash_codes",
]
