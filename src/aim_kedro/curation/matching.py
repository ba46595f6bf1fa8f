"""Pairs of matching images over compact per-sample arrays: equal hashes, near pHashes, close
embeddings.

Perceptual hashes within a Hamming radius come from faiss ``IndexBinaryFlat`` range searches
(a crop hash of one image against the pHash of the other catches cropped copies), image
embeddings whose cosine reaches a threshold from ``IndexFlatIP``; colour grids then confirm
pHash matches. ``UnionFind`` merges matched pairs into clusters. Used by ``dedup`` (pool against
itself) and ``eval_leaks`` (pool against the evaluation test set).
"""

from __future__ import annotations

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
        crop_owner = np.zeros(0, dtype=np.int64)
        if "phash_crops" in table.columns and table.height:
            crops = table["phash_crops"].to_list()
            counts = np.array([len(c or []) for c in crops], dtype=np.int64)
            if counts.sum():
                flat = np.array([h for c in crops for h in (c or [])], dtype=np.uint64)
                crop_codes = phash_codes(flat)
                crop_owner = np.repeat(np.arange(len(crops)), counts)
        grids = None
        if "color_grid" in table.columns and table.height:
            values = table["color_grid"].to_list()
            width = max((len(v) for v in values if v is not None), default=0)
            if width and all(v is not None and len(v) == width for v in values):
                grids = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), width)
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
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(np.ascontiguousarray(base))
    return _range_pairs(index, np.ascontiguousarray(codes), int(radius) + 1, others is None)


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


def equal_pairs(values: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of positions holding the same non-null value (each linked to the group's first)."""
    first: dict[str, int] = {}
    rows, cols = [], []
    for i, value in enumerate(values):
        if value is None:
            continue
        j = first.setdefault(value, i)
        if j != i:
            rows.append(j)
            cols.append(i)
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


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
    i, j = _unique_pairs(np.concatenate(rows), np.concatenate(cols), symmetric)
    if max_color is not None and a.grids is not None and other.grids is not None and len(i):
        keep = color_distance(a.grids[i], other.grids[j]) <= float(max_color) + 1e-6
        i, j = i[keep], j[keep]
    return i, j


__all__ = [
    "HashArrays",
    "UnionFind",
    "color_distance",
    "cosine_pairs",
    "equal_pairs",
    "hamming_distance",
    "hamming_pairs",
    "hash_pairs",
    "normalized",
    "phash_codes",
]
