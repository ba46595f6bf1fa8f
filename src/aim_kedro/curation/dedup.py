"""Exact and near-duplicate decisions over the pool, after the evaluation-leak check.

Matches come from a cheap first pass (``matching``): equal sha256 of the bytes or of the
decoded pixels, perceptual hashes within a Hamming radius whose colours agree, and image
embeddings whose cosine reaches a threshold; then, with ``copy_detection``, from copy
detection: the nearest neighbours of a learned copy descriptor (``copydetect``, candidates by
``matching.knn_pairs``) and the pHash matches whose colours disagree (a greyscale or re-lit
copy) are verified with local features and pixels (``verify``), in order of similarity,
skipping pairs already in one cluster. All matched pairs are merged by union-find into
clusters, and each row records the kind of match that joined it. Pool samples that match an
image of an evaluation set (``eval_leaks``, the same machinery) are rejected ``eval_leak``
first; in each
cluster one of the samples still in the running is kept and the others are rejected
``duplicate``. The keeper is chosen by a total order that last-bit noise in the scores cannot
flip: the candidates within ``score_tolerance`` of the cluster's best clip_score are tied, and
the smallest uid among them wins.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.copydetect import DescriptorConfig
from aim_kedro.curation.eval_leaks import EVAL_LEAK, CopyInputs, EvalIndex, eval_matches
from aim_kedro.curation.filters import DECISION_SCHEMA
from aim_kedro.curation.matching import (
    CandidateConfig,
    HashArrays,
    UnionFind,
    colour_agrees,
    cosine_pairs,
    equal_pairs,
    hash_candidates,
    knn_pairs,
)
from aim_kedro.curation.reasons import DUPLICATE
from aim_kedro.curation.verify import ImageLoader, VerifyConfig, VerifyStats, verify_candidates

logger = logging.getLogger(__name__)


DEDUP_SCHEMA: dict[str, pl.DataType] = {
    **DECISION_SCHEMA, "dedup_cluster": pl.Int64(), "eval_id": pl.String(),
    "match_kind": pl.String(),
}

POOL_COLUMNS = (
    "uid", "shard", "key", "position", "sha256_bytes", "sha256_pixels", "phash", "phash_crops",
    "color_grid",
)


@dataclass(frozen=True)
class DedupConfig:
    """Match rules of ``curation.dedup``; a null radius or threshold switches that rule off.

    Two images match when their bytes or decoded pixels hash equal (``exact``); or when their
    pHashes differ in at most ``phash_radius`` bits, or a corner/centre crop hash of one is
    within ``crop_phash_radius`` bits of the other's pHash, and (if ``max_color_distance`` is
    set) their colour grids differ by at most that RMS distance (0-255 scale); or when their
    image embeddings reach cosine ``embedding_threshold``. The ``eval_*`` rules decide in the
    same way when a pool sample leaks a test image. With ``copy_detection`` (pool against
    itself) and ``eval_copy_detection`` (pool against the evaluation sets), pairs that the
    ``descriptor`` proposes (``candidates``) and pHash matches with disagreeing colours are
    copies when ``verify`` confirms them.
    Inside a cluster, the candidates whose clip_score is within ``score_tolerance`` of the best
    are tied and the smallest uid wins. The report lists the ``report_clusters`` largest
    clusters with the kinds of match that joined them (all are in ``dedup_decisions``).
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
    copy_detection: bool = False
    eval_copy_detection: bool = True
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    report_clusters: int = 100

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
        for name in ("copy_detection", "eval_copy_detection"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"curation.dedup.{name} must be true or false, got {getattr(self, name)!r}"
                )
        for name, cls in (("descriptor", DescriptorConfig), ("candidates", CandidateConfig),
                          ("verify", VerifyConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, from_mapping(cls, value, f"curation.dedup.{name}"))
            elif not isinstance(value, cls):
                raise ValueError(f"curation.dedup.{name} must be a mapping, got {value!r}")
        if isinstance(self.report_clusters, bool) or not isinstance(self.report_clusters, int) or (
            self.report_clusters < 0
        ):
            raise ValueError(
                f"curation.dedup.report_clusters must be an integer >= 0, got {self.report_clusters!r}"
            )

    @property
    def describes(self) -> bool:
        """Whether copy descriptors are needed (pool or evaluation-set copy detection)."""
        return self.copy_detection or self.eval_copy_detection

    @property
    def needs_embeddings(self) -> bool:
        """Whether any rule compares image embeddings."""
        return self.embedding_threshold is not None or self.eval_embedding_threshold is not None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DedupConfig:
        """Build from ``curation.dedup``; an unknown key raises a ValueError naming the valid ones."""
        return from_mapping(cls, values, "curation.dedup")


def match_pairs(
    sha256_bytes: Sequence[str | None] | pl.Series,
    sha256_pixels: Sequence[str | None] | pl.Series,
    hashes: HashArrays,
    embeddings: np.ndarray | None,
    cfg: DedupConfig,
) -> tuple[list[tuple[np.ndarray, np.ndarray, str]], tuple[np.ndarray, np.ndarray]]:
    """The cheap first pass: matched pairs among pool samples as ``(i, j, how)`` groups,
    strongest evidence first, and the pHash matches whose colours disagree (for verification)."""
    groups: list[tuple[np.ndarray, np.ndarray, str]] = []
    misses = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if cfg.exact:
        for name, values in (("sha256_bytes", sha256_bytes), ("sha256_pixels", sha256_pixels)):
            i, j = equal_pairs(values)
            groups.append((i, j, f"same {name}"))
    if cfg.phash_radius is not None or cfg.crop_phash_radius is not None:
        i, j = hash_candidates(hashes, cfg.phash_radius, cfg.crop_phash_radius)
        agree = colour_agrees(hashes, i, j, cfg.max_color_distance)
        groups.append((i[agree], j[agree], "perceptual hash"))
        misses = (i[~agree], j[~agree])
    if embeddings is not None and cfg.embedding_threshold is not None:
        i, j, _ = cosine_pairs(embeddings, cfg.embedding_threshold)
        groups.append((i, j, f"embedding cosine >= {cfg.embedding_threshold:g}"))
    return groups, misses


def _copy_detection(
    rows: np.ndarray, misses: tuple[np.ndarray, np.ndarray], descriptors: np.ndarray,
    images: ImageLoader, uf: UnionFind, cfg: DedupConfig,
) -> tuple[list[tuple[int, int, str]], dict[str, Any]]:
    """The verified copy pairs (pool rows, kind) among the descriptor candidates of ``rows``
    and the colour-disagreeing pHash matches, most similar first; pairs already in one
    cluster are skipped. Unions them into ``uf`` as it goes."""
    i, j, sim = knn_pairs(descriptors[rows], cfg.candidates)
    ci = np.concatenate([misses[0], i])
    cj = np.concatenate([misses[1], j])
    order = np.argsort(-np.concatenate([np.full(len(misses[0]), 2.0), sim]), kind="stable")
    stats = VerifyStats()
    edges = []
    for a, b, verdict in verify_candidates(
        rows[ci[order]], rows[cj[order]], images, None, cfg.verify, joined=uf.connected,
        stats=stats,
    ):
        if verdict.copy:
            uf.union(a, b)
            edges.append((a, b, f"copy detection: {verdict.kind}"))
    return edges, {"candidate_pairs": int(len(i)), "colour_misses": int(len(misses[0])),
                   **stats.as_dict()}


def cluster_ids(roots: np.ndarray, in_cluster: np.ndarray) -> np.ndarray:
    """Cluster ids 0, 1, ... in the order each cluster's first row appears, -1 for a row
    in no cluster; ``roots`` are the rows' union-find roots."""
    cluster_id = np.full(len(roots), -1, dtype=np.int64)
    rows = np.flatnonzero(in_cluster)
    if len(rows):
        found, first, inverse = np.unique(roots[rows], return_index=True, return_inverse=True)
        rank = np.empty(len(found), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(found))
        cluster_id[rows] = rank[inverse.reshape(-1)]
    return cluster_id


def cluster_keepers(
    cluster_id: np.ndarray,
    scores: np.ndarray,
    uids: Sequence[str] | pl.Series,
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
    *,
    descriptors: np.ndarray | None = None,
    eval_descriptors: np.ndarray | None = None,
    images: ImageLoader | None = None,
    eval_images: ImageLoader | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Eval-leak and duplicate decisions for every pool row.

    ``pool`` (see ``dedup_pool``) has uid, sha256_bytes, sha256_pixels, phash, phash_crops,
    color_grid, clip_score and ``candidate`` (the sample survived every earlier stage); rows
    without a phash (undecodable) take part in nothing. ``embeddings`` are the pool's image
    embeddings in row order (or None). Copy detection (``cfg.copy_detection``) needs the
    pool's ``descriptors`` in row order and ``images`` (an ``ImageLoader`` of pool rows), and
    for the evaluation images their ``eval_descriptors`` and ``eval_images``.

    Returns uid, reject_reason (``eval_leak``/``duplicate``/null; only candidates get one),
    reject_detail, dedup_cluster (id of the duplicate cluster, null for a sample without
    duplicates), eval_id (the leaked test image, for any row) and match_kind (how the row
    joined its cluster, or how it leaked) plus a summary dict. Each cluster keeps one
    candidate that is not a leak (``cluster_keepers``).
    """
    n = pool.height
    if cfg.copy_detection and (descriptors is None or images is None):
        raise ValueError(
            "curation.dedup.copy_detection needs the pool's descriptors (copy_descriptors) and "
            "its images (raw_pool); pass them, or set curation.dedup.copy_detection: false"
        )
    valid = pool["phash"].is_not_null().to_numpy()
    candidate = pool["candidate"].fill_null(False).to_numpy() & valid
    eval_stats: dict[str, Any] = {}
    rows = np.flatnonzero(valid)
    sub = pool.filter(pl.Series(valid))  # the rows of ``rows``, in order
    hashes = HashArrays.from_table(sub)  # built once: the leak check and the pool pass share it
    evals = EvalIndex(eval_table, eval_embeddings, eval_descriptors)
    leak_ids, leak_how = eval_matches(pool, embeddings, evals, cfg,
                                      CopyInputs(descriptors, images, eval_images), eval_stats,
                                      pool_hashes=hashes)

    sub_emb = embeddings[rows] if embeddings is not None and len(rows) else None
    groups, misses = match_pairs(sub["sha256_bytes"], sub["sha256_pixels"], hashes, sub_emb, cfg)
    uf = UnionFind(n)
    pair_counts: dict[str, int] = {}
    edges: list[tuple[int, int, str]] = []
    for i, j, why in groups:
        pair_counts[why] = int(len(i))
        for a, b in zip(rows[i].tolist(), rows[j].tolist(), strict=True):
            uf.union(a, b)
            edges.append((a, b, why))
    copy_stats: dict[str, Any] = {}
    if cfg.copy_detection and len(rows):
        assert descriptors is not None and images is not None
        found, copy_stats = _copy_detection(rows, misses, descriptors, images, uf, cfg)
        edges.extend(found)
        for _, _, why in found:
            pair_counts[why] = pair_counts.get(why, 0) + 1
    how: dict[int, str] = {}  # how each matched row first joined its cluster (sparse)
    for a, b, why in edges:
        how.setdefault(a, why)
        how.setdefault(b, why)
    roots = uf.roots()
    sizes = np.bincount(roots, minlength=n)
    in_cluster = sizes[roots] > 1
    cluster_id = cluster_ids(roots, in_cluster)
    next_id = int(cluster_id.max()) + 1 if n else 0

    uids = pool["uid"]
    leaked = np.fromiter((e is not None for e in leak_ids), dtype=bool, count=n)
    contender = candidate & ~leaked
    scores = pool["clip_score"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    best = cluster_keepers(cluster_id, scores, uids, contender & in_cluster, cfg.score_tolerance)
    is_keeper = np.zeros(n, dtype=bool)
    is_keeper[list(best.values())] = True
    leak_rows = np.flatnonzero(candidate & leaked)
    dup_rows = np.flatnonzero(contender & in_cluster & ~is_keeper)
    # Only the rejected and matched rows get Python strings: the rest stay null columns.
    reasons = pl.Series("reject_reason", [None] * n, dtype=pl.String)
    details = pl.Series("reject_detail", [None] * n, dtype=pl.String)
    if len(leak_rows):
        reasons.scatter(leak_rows, EVAL_LEAK)
        details.scatter(leak_rows, [f"matches {leak_ids[i]} of the evaluation set "
                                    f"({leak_how[i]})" for i in leak_rows.tolist()])
    if len(dup_rows):
        reasons.scatter(dup_rows, DUPLICATE)
        details.scatter(dup_rows, [
            f"duplicate of {uids[best[int(cluster_id[i])]]} in cluster {int(cluster_id[i])} "
            f"of {int(sizes[roots[i]])} ({how[i]})" for i in dup_rows.tolist()])
    kinds = pl.Series("match_kind", leak_how, dtype=pl.String)
    matched = sorted(i for i in how if leak_how[i] is None and in_cluster[i])
    if matched:
        kinds.scatter(matched, [how[i] for i in matched])
    out = pl.DataFrame(
        {
            "uid": uids,
            "reject_reason": reasons,
            "reject_detail": details,
            "dedup_cluster": pl.Series(cluster_id).set(pl.Series(cluster_id < 0), None),
            "eval_id": pl.Series(leak_ids, dtype=pl.String),
            "match_kind": kinds,
        },
        schema=DEDUP_SCHEMA,
    )
    summary = {
        "samples": n,
        "candidates": int(candidate.sum()),
        "matched_pairs": pair_counts,
        "clusters": next_id,
        "samples_in_clusters": int(in_cluster.sum()),
        "eval_matches": int(leaked.sum()),
        "rejected_eval_leak": len(leak_rows),
        "rejected_duplicate": len(dup_rows),
        "eval_matches_by_kind": _counts(h for h in leak_how if h is not None),
        **cluster_kinds(edges, cluster_id, sizes[roots], cfg.report_clusters),
    }
    if cfg.describes:
        summary["copy_detection"] = {"pool": copy_stats, "eval": eval_stats}
    return out, summary


def _counts(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def cluster_kinds(
    edges: Sequence[tuple[int, int, str]], cluster_id: np.ndarray, size: np.ndarray, listed: int
) -> dict[str, Any]:
    """Per cluster, the kinds of match that joined it: ``clusters_by_kind`` (how many clusters
    each kind joined, a cluster counted once per kind) and ``cluster_match_kinds`` (the
    ``listed`` largest clusters: id, size, edges per kind)."""
    per: dict[int, dict[str, int]] = {}
    sizes: dict[int, int] = {}
    for a, _, why in edges:
        cid = int(cluster_id[a])
        sizes[cid] = int(size[a])
        kinds = per.setdefault(cid, {})
        kinds[why] = kinds.get(why, 0) + 1
    by_kind = _counts(kind for kinds in per.values() for kind in kinds)
    largest = sorted(per, key=lambda c: (-sizes[c], c))
    table = [{"cluster": cid, "size": sizes[cid], "joined_by": dict(sorted(per[cid].items()))}
             for cid in largest[:listed]]
    return {"clusters_by_kind": by_kind, "cluster_match_kinds": table}


__all__ = [
    "DEDUP_SCHEMA",
    "DUPLICATE",
    "POOL_COLUMNS",
    "DedupConfig",
    "cluster_ids",
    "cluster_keepers",
    "cluster_kinds",
    "dedup_pool",
    "deduplicate",
    "match_pairs",
    "pool_embeddings",
]
