"""Exact, near-duplicate and evaluation-leak detection over compact per-sample arrays.

Matches come from three sources: equal sha256 of the bytes or of the decoded pixels, perceptual
hashes within a Hamming radius (faiss ``IndexBinaryFlat``), and image embeddings whose cosine
reaches a threshold (faiss ``IndexFlatIP`` range search). All matched pairs are merged by
union-find into clusters; in each cluster the best-scoring sample among those still in the
running is kept and the others are rejected ``duplicate``. Pool samples that match an image of
the evaluation test set are rejected ``eval_leak`` before clustering decides anything.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import polars as pl
from PIL import Image

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.index import (
    DecodeError,
    IndexConfig,
    color_grid,
    crop_hashes,
    decode_image,
    perceptual_hash,
    pixel_sha256,
)
from aim_kedro.io.shards import Sample, image_bytes, sample_json

logger = logging.getLogger(__name__)

DUPLICATE = "duplicate"
EVAL_LEAK = "eval_leak"
QUERY_CHUNK = 4096

DEDUP_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "reject_reason": pl.String(),
    "reject_detail": pl.String(),
    "dedup_cluster": pl.Int64(),
    "eval_id": pl.String(),
}

EVAL_SCHEMA: dict[str, pl.DataType] = {
    "eval_id": pl.String(),
    "sha256_bytes": pl.String(),
    "sha256_pixels": pl.String(),
    "phash": pl.UInt64(),
    "phash_crops": pl.List(pl.UInt64()),
    "color_grid": pl.Binary(),
}


@dataclass(frozen=True)
class DedupConfig:
    """Match rules of ``curation.dedup``; a null radius or threshold switches that rule off.

    Two images match when their bytes or decoded pixels hash equal (``exact``); or when their
    pHashes differ in at most ``phash_radius`` bits, or a corner/centre crop hash of one is
    within ``crop_phash_radius`` bits of the other's pHash, and (if ``max_color_distance`` is
    set) their colour grids differ by at most that RMS distance (0-255 scale); or when their
    image embeddings reach cosine ``embedding_threshold``. The ``eval_*`` rules decide in the
    same way when a pool sample leaks a test image.
    """

    exact: bool = True
    phash_radius: int | None = 4
    crop_phash_radius: int | None = 4
    max_color_distance: float | None = 15.0
    embedding_threshold: float | None = None
    eval_exact: bool = True
    eval_phash_radius: int | None = 6
    eval_crop_phash_radius: int | None = 4
    eval_max_color_distance: float | None = 15.0
    eval_embedding_threshold: float | None = None

    def __post_init__(self) -> None:
        for name in ("phash_radius", "crop_phash_radius", "eval_phash_radius", "eval_crop_phash_radius"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 0 <= int(value) <= 64):
                raise ValueError(
                    f"curation.dedup.{name} must be a Hamming radius in [0, 64] bits or null "
                    f"(rule off), got {value!r}"
                )
        for name in ("embedding_threshold", "eval_embedding_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= float(value) <= 1.0:
                raise ValueError(
                    f"curation.dedup.{name} must be a cosine in [-1, 1] or null (rule off), "
                    f"got {value!r}"
                )
        for name in ("max_color_distance", "eval_max_color_distance"):
            value = getattr(self, name)
            if value is not None and not float(value) >= 0.0:
                raise ValueError(
                    f"curation.dedup.{name} must be >= 0 (RMS distance of the colour grids, "
                    f"0-255 scale) or null (no colour check), got {value!r}"
                )

    @property
    def needs_embeddings(self) -> bool:
        """Whether any rule compares image embeddings."""
        return self.embedding_threshold is not None or self.eval_embedding_threshold is not None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DedupConfig:
        """Build from ``curation.dedup``; an unknown key raises a ValueError naming the valid ones."""
        return from_mapping(cls, values, "curation.dedup")


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


def match_pairs(
    sha256_bytes: Sequence[str | None],
    sha256_pixels: Sequence[str | None],
    hashes: HashArrays,
    embeddings: np.ndarray | None,
    cfg: DedupConfig,
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """All matched pairs among pool samples, as ``(i, j, how)`` groups, strongest evidence first."""
    groups: list[tuple[np.ndarray, np.ndarray, str]] = []
    if cfg.exact:
        for name, values in (("sha256_bytes", sha256_bytes), ("sha256_pixels", sha256_pixels)):
            i, j = equal_pairs(values)
            groups.append((i, j, f"same {name}"))
    if cfg.phash_radius is not None or cfg.crop_phash_radius is not None:
        i, j = hash_pairs(hashes, cfg.phash_radius, cfg.crop_phash_radius, cfg.max_color_distance)
        groups.append((i, j, "perceptual hash"))
    if embeddings is not None and cfg.embedding_threshold is not None:
        i, j, _ = cosine_pairs(embeddings, cfg.embedding_threshold)
        groups.append((i, j, f"embedding cosine >= {cfg.embedding_threshold:g}"))
    return groups


def eval_matches(
    pool: pl.DataFrame,
    pool_embeddings: np.ndarray | None,
    eval_table: pl.DataFrame,
    eval_embeddings: np.ndarray | None,
    cfg: DedupConfig,
) -> tuple[list[str | None], list[str | None]]:
    """For every pool row, the eval_id it leaks (or None) and how it matched."""
    n = pool.height
    found: list[str | None] = [None] * n
    how: list[str | None] = [None] * n
    if eval_table.height == 0 or n == 0:
        return found, how
    eval_ids = eval_table["eval_id"].to_list()

    def mark(rows: Iterable[int], cols: Iterable[int], why: str) -> None:
        for r, c in zip(rows, cols, strict=True):
            if found[r] is None:
                found[r] = eval_ids[c]
                how[r] = why

    if cfg.eval_exact:
        for column in ("sha256_bytes", "sha256_pixels"):
            lookup = {v: k for k, v in enumerate(eval_table[column].to_list()) if v is not None}
            pairs = [(r, lookup[v]) for r, v in enumerate(pool[column].to_list()) if v in lookup]
            mark((p[0] for p in pairs), (p[1] for p in pairs), f"same {column}")
    rows_valid = np.flatnonzero(pool["phash"].is_not_null().to_numpy())
    eval_valid = np.flatnonzero(eval_table["phash"].is_not_null().to_numpy())
    if (cfg.eval_phash_radius is not None or cfg.eval_crop_phash_radius is not None) and len(
        rows_valid
    ) and len(eval_valid):
        a = HashArrays.from_table(pool[rows_valid.tolist()])
        b = HashArrays.from_table(eval_table[eval_valid.tolist()])
        i, j = hash_pairs(
            a, cfg.eval_phash_radius, cfg.eval_crop_phash_radius, cfg.eval_max_color_distance, b
        )
        mark(rows_valid[i], eval_valid[j], "perceptual hash")
    if (
        cfg.eval_embedding_threshold is not None
        and pool_embeddings is not None
        and eval_embeddings is not None
        and len(rows_valid)
    ):
        i, j, sim = cosine_pairs(
            pool_embeddings[rows_valid], cfg.eval_embedding_threshold, eval_embeddings
        )
        order = np.argsort(-sim, kind="stable")
        mark(
            rows_valid[i[order]],
            j[order],
            f"embedding cosine >= {cfg.eval_embedding_threshold:g}",
        )
    return found, how


def deduplicate(
    pool: pl.DataFrame,
    embeddings: np.ndarray | None,
    eval_table: pl.DataFrame,
    eval_embeddings: np.ndarray | None,
    cfg: DedupConfig,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Eval-leak and duplicate decisions for every pool row.

    ``pool`` has uid, sha256_bytes, sha256_pixels, phash, phash_crops, color_grid, clip_score
    and ``candidate`` (the
    sample survived every earlier stage); rows without a phash (undecodable) take part in
    nothing. ``embeddings`` are the pool's image embeddings in row order (or None).

    Returns uid, reject_reason (``eval_leak``/``duplicate``/null; only candidates get one),
    reject_detail, dedup_cluster (id of the duplicate cluster, null for a sample without
    duplicates) and eval_id (the leaked test image, for any row) plus a summary dict.
    Each cluster keeps its best-scoring candidate that is not a leak (ties: the earlier row).
    """
    n = pool.height
    valid = pool["phash"].is_not_null().to_numpy()
    candidate = pool["candidate"].fill_null(False).to_numpy() & valid
    leak_ids, leak_how = eval_matches(pool, embeddings, eval_table, eval_embeddings, cfg)

    rows = np.flatnonzero(valid)
    sub = pool[rows.tolist()] if len(rows) else pool.clear()
    sub_emb = embeddings[rows] if embeddings is not None and len(rows) else None
    groups = match_pairs(
        sub["sha256_bytes"].to_list(),
        sub["sha256_pixels"].to_list(),
        HashArrays.from_table(sub),
        sub_emb,
        cfg,
    )
    uf = UnionFind(n)
    how: list[str | None] = [None] * n
    pair_counts: dict[str, int] = {}
    for i, j, why in groups:
        pair_counts[why] = int(len(i))
        for a, b in zip(rows[i].tolist(), rows[j].tolist(), strict=True):
            uf.union(a, b)
            how[a] = how[a] or why
            how[b] = how[b] or why
    roots = uf.roots()
    sizes = np.bincount(roots, minlength=n)
    in_cluster = sizes[roots] > 1

    cluster_id = np.full(n, -1, dtype=np.int64)
    next_id = 0
    root_to_id: dict[int, int] = {}
    for i in np.flatnonzero(in_cluster).tolist():
        r = int(roots[i])
        if r not in root_to_id:
            root_to_id[r] = next_id
            next_id += 1
        cluster_id[i] = root_to_id[r]

    scores = pool["clip_score"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    ranked = np.where(np.isfinite(scores), scores, -np.inf)
    contender = candidate & np.array([e is None for e in leak_ids], dtype=bool)
    best: dict[int, int] = {}
    for i in np.flatnonzero(contender & in_cluster).tolist():
        cid = int(cluster_id[i])
        j = best.get(cid)
        if j is None or ranked[i] > ranked[j]:
            best[cid] = i

    uids = pool["uid"].to_list()
    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    for i in range(n):
        if not candidate[i]:
            continue
        if leak_ids[i] is not None:
            reasons[i] = EVAL_LEAK
            details[i] = f"matches {leak_ids[i]} of the evaluation set ({leak_how[i]})"
        elif in_cluster[i] and best.get(int(cluster_id[i])) != i:
            keeper = uids[best[int(cluster_id[i])]]
            reasons[i] = DUPLICATE
            details[i] = (
                f"duplicate of {keeper} in cluster {int(cluster_id[i])} of "
                f"{int(sizes[roots[i]])} ({how[i]})"
            )
    out = pl.DataFrame(
        {
            "uid": uids,
            "reject_reason": reasons,
            "reject_detail": details,
            "dedup_cluster": [int(c) if c >= 0 else None for c in cluster_id],
            "eval_id": leak_ids,
        },
        schema=DEDUP_SCHEMA,
    )
    summary = {
        "samples": n,
        "candidates": int(candidate.sum()),
        "matched_pairs": pair_counts,
        "clusters": next_id,
        "samples_in_clusters": int(in_cluster.sum()),
        "eval_matches": int(sum(e is not None for e in leak_ids)),
        "rejected_eval_leak": int(sum(r == EVAL_LEAK for r in reasons)),
        "rejected_duplicate": int(sum(r == DUPLICATE for r in reasons)),
    }
    return out, summary


def eval_records(
    samples: Iterable[Sample], cfg: IndexConfig
) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """Hash rows of test samples (as ``EVAL_SCHEMA``) and their decoded images, hashed exactly
    as the pool index hashes pool samples."""
    for position, sample in enumerate(samples):
        meta = sample_json(sample)
        eval_id = meta.get("eval_id") or f"{sample.get('__shard__')}/{sample.get('__key__', position)}"
        row: dict[str, Any] = {name: None for name in EVAL_SCHEMA}
        row["eval_id"] = str(eval_id)
        found = image_bytes(sample)
        if found is None:
            yield row, None
            continue
        row["sha256_bytes"] = hashlib.sha256(found[1]).hexdigest()
        try:
            image = decode_image(found[1], cfg.max_image_pixels)
        except DecodeError:
            yield row, None
            continue
        row.update(
            sha256_pixels=pixel_sha256(image),
            phash=perceptual_hash(image),
            phash_crops=crop_hashes(image, cfg.crop_fractions),
            color_grid=color_grid(image, cfg.color_grid_size),
        )
        yield row, image


__all__ = [
    "DEDUP_SCHEMA",
    "DUPLICATE",
    "EVAL_LEAK",
    "EVAL_SCHEMA",
    "DedupConfig",
    "HashArrays",
    "UnionFind",
    "color_distance",
    "cosine_pairs",
    "deduplicate",
    "equal_pairs",
    "eval_matches",
    "eval_records",
    "hamming_distance",
    "hamming_pairs",
    "hash_pairs",
    "match_pairs",
    "normalized",
    "phash_codes",
]
