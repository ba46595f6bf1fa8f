"""Exact and near-duplicate decisions over the pool, after the evaluation-leak check.

Matches come from three sources (``matching``): equal sha256 of the bytes or of the decoded
pixels, perceptual hashes within a Hamming radius, and image embeddings whose cosine reaches a
threshold. All matched pairs are merged by union-find into clusters. Pool samples that match an
image of the evaluation test set (``eval_leaks``) are rejected ``eval_leak`` first; in each
cluster one of the samples still in the running is kept and the others are rejected
``duplicate``. The keeper is chosen by a total order that last-bit noise in the scores cannot
flip: the candidates within ``score_tolerance`` of the cluster's best clip_score are tied, and
the smallest uid among them wins.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.eval_leaks import EVAL_LEAK, eval_matches
from aim_kedro.curation.filters import DECISION_SCHEMA
from aim_kedro.curation.matching import (
    HashArrays,
    UnionFind,
    cosine_pairs,
    equal_pairs,
    hash_pairs,
)
from aim_kedro.curation.reasons import DUPLICATE

logger = logging.getLogger(__name__)


DEDUP_SCHEMA: dict[str, pl.DataType] = {
    **DECISION_SCHEMA, "dedup_cluster": pl.Int64(), "eval_id": pl.String(),
}

POOL_COLUMNS = ("uid", "sha256_bytes", "sha256_pixels", "phash", "phash_crops", "color_grid")


@dataclass(frozen=True)
class DedupConfig:
    """Match rules of ``curation.dedup``; a null radius or threshold switches that rule off.

    Two images match when their bytes or decoded pixels hash equal (``exact``); or when their
    pHashes differ in at most ``phash_radius`` bits, or a corner/centre crop hash of one is
    within ``crop_phash_radius`` bits of the other's pHash, and (if ``max_color_distance`` is
    set) their colour grids differ by at most that RMS distance (0-255 scale); or when their
    image embeddings reach cosine ``embedding_threshold``. The ``eval_*`` rules decide in the
    same way when a pool sample leaks a test image. Inside a cluster, the candidates whose
    clip_score is within ``score_tolerance`` of the best are tied and the smallest uid wins.
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
    score_tolerance: float = 1.0e-4

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
        tolerance = self.score_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
            0.0 <= float(tolerance) < 1.0
        ):
            raise ValueError(
                f"curation.dedup.score_tolerance must be a clip_score difference in [0, 1), got "
                f"{tolerance!r}; e.g. 1.0e-4 (scores closer than that are tied, smallest uid wins)"
            )

    @property
    def needs_embeddings(self) -> bool:
        """Whether any rule compares image embeddings."""
        return self.embedding_threshold is not None or self.eval_embedding_threshold is not None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DedupConfig:
        """Build from ``curation.dedup``; an unknown key raises a ValueError naming the valid ones."""
        return from_mapping(cls, values, "curation.dedup")


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


def cluster_keepers(
    cluster_id: np.ndarray,
    scores: np.ndarray,
    uids: Sequence[str],
    eligible: np.ndarray,
    tolerance: float,
) -> dict[int, int]:
    """The row each cluster keeps, among its ``eligible`` rows: those whose score is within
    ``tolerance`` of the cluster's best are tied and the smallest uid among them wins, a total
    order that a last-bit change of a score cannot flip. NaN scores rank last."""
    values = np.asarray(scores, dtype=np.float64)
    ranked = np.where(np.isfinite(values), values, -np.inf)
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(eligible).tolist():
        members.setdefault(int(cluster_id[i]), []).append(i)
    keepers = {}
    for cid, rows in members.items():
        top = max(ranked[i] for i in rows)
        tied = [i for i in rows if ranked[i] >= top - tolerance]
        keepers[cid] = min(tied, key=lambda i: uids[i])
    return keepers


def dedup_pool(
    pool_index: pl.DataFrame, clip_scores: pl.DataFrame, filter_decisions: pl.DataFrame
) -> pl.DataFrame:
    """The table ``deduplicate`` works on: the index's hash columns in index order with each
    row's clip_score and ``candidate`` (neither the index nor the filters rejected it)."""
    return (
        pool_index.select(*POOL_COLUMNS, pl.col("reject_reason").alias("index_reason"))
        .join(clip_scores.select("uid", "clip_score"), on="uid", how="left", maintain_order="left")
        .join(
            filter_decisions.select("uid", pl.col("reject_reason").alias("filter_reason")),
            on="uid", how="left", maintain_order="left",
        )
        .with_columns(
            candidate=pl.col("index_reason").is_null() & pl.col("filter_reason").is_null()
        )
    )


def pool_embeddings(pool: pl.DataFrame, clip_embeddings: pl.DataFrame) -> np.ndarray:
    """The ``image_emb`` of ``clip_embeddings`` (uid, image_emb) aligned to the rows of
    ``pool``, float16; rows without an embedding (never scored) are zeros."""
    aligned = pool.select("uid").join(
        clip_embeddings.select("uid", "image_emb"), on="uid", how="left", maintain_order="left"
    )
    dim = clip_embeddings["image_emb"].dtype.size if clip_embeddings.height else 1
    embeddings = np.zeros((pool.height, dim), dtype=np.float16)
    present = aligned["image_emb"].is_not_null().to_numpy()
    if present.any():
        embeddings[present] = aligned.filter(pl.col("image_emb").is_not_null())[
            "image_emb"
        ].to_numpy()
    return embeddings


def deduplicate(
    pool: pl.DataFrame,
    embeddings: np.ndarray | None,
    eval_table: pl.DataFrame,
    eval_embeddings: np.ndarray | None,
    cfg: DedupConfig,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Eval-leak and duplicate decisions for every pool row.

    ``pool`` (see ``dedup_pool``) has uid, sha256_bytes, sha256_pixels, phash, phash_crops,
    color_grid, clip_score and ``candidate`` (the sample survived every earlier stage); rows
    without a phash (undecodable) take part in nothing. ``embeddings`` are the pool's image
    embeddings in row order (or None).

    Returns uid, reject_reason (``eval_leak``/``duplicate``/null; only candidates get one),
    reject_detail, dedup_cluster (id of the duplicate cluster, null for a sample without
    duplicates) and eval_id (the leaked test image, for any row) plus a summary dict.
    Each cluster keeps one candidate that is not a leak (``cluster_keepers``).
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

    uids = pool["uid"].to_list()
    contender = candidate & np.array([e is None for e in leak_ids], dtype=bool)
    scores = pool["clip_score"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    best = cluster_keepers(cluster_id, scores, uids, contender & in_cluster, cfg.score_tolerance)

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


__all__ = [
    "DEDUP_SCHEMA",
    "DUPLICATE",
    "POOL_COLUMNS",
    "DedupConfig",
    "cluster_keepers",
    "dedup_pool",
    "deduplicate",
    "match_pairs",
    "pool_embeddings",
]
