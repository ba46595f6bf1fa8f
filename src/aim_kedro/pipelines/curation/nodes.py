"""Nodes of the ``curation`` pipeline: thin glue between the catalog and ``aim_kedro.curation``.

Each node takes the parameter blocks it uses (``params:curation.dedup``, ...) and builds their
typed configs (cheap); the run hook checks the whole ``params:curation`` tree once, before the
first node, with ``validate_curation_params``. The per-shard stages run on the executor that
``curation.executor`` names (``curation.executors.make_executor``); the decision order and the
score cut are those of ``curation.manifest``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from aim_kedro.curation.config import (
    FacesConfig,
    ReportConfig,
    ScoringConfig,
    block,
    check_progress,
    check_scoring_model,
    validate_curation_params,
)
from aim_kedro.curation.dedup import DedupConfig, dedup_pool, deduplicate, pool_embeddings
from aim_kedro.curation.eval_leaks import eval_index
from aim_kedro.curation.executors import ExecutorConfig, make_executor
from aim_kedro.curation.filter_network import FilterNetworkConfig, train_filter_network
from aim_kedro.curation.filters import FilterConfig, filter_decisions
from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.curation.manifest import build_manifest, dfn_manifest, subset_rows
from aim_kedro.curation.plots import curation_figures
from aim_kedro.curation.pool_scoring import precomputed_scores, score_index, score_tables
from aim_kedro.curation.report import build_report
from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.curation.subset import (
    SubsetConfig,
    check_subset,
    detect_faces,
    iter_subset,
    resize_note,
)
from aim_kedro.io.shards import ERROR_KEY, Sample, ShardSet, image_bytes, sample_text
from aim_kedro.io.uids import is_hex_uid, to_datacomp

logger = logging.getLogger(__name__)

Params = dict[str, Any]


def _done(node: str, start: float, message: str, *args: Any) -> float:
    seconds = time.perf_counter() - start
    logger.info(f"{node}: {message} in %.1f s", *args, seconds)
    return round(seconds, 3)


def _executor(executor: Params | None, progress: bool) -> Any:
    return make_executor(block(ExecutorConfig, executor), check_progress(progress))


def build_pool_index(
    raw_pool: ShardSet, index: Params, executor: Params, progress: bool
) -> tuple[pl.DataFrame, dict]:
    """Decode every pool sample safely and index it (sizes, hashes, caption, reject reason)."""
    start = time.perf_counter()
    table, summary = build_index(raw_pool, block(IndexConfig, index),
                                 _executor(executor, progress))
    summary["seconds"] = _done("build_pool_index", start, "%d samples in %d shards, %d valid, "
                               "rejected %s", table.height, summary["shards"], summary["valid"],
                               summary["rejected"])
    return table, summary


def train_filter_network_node(
    trusted_pairs: ShardSet, filter_network: Params, scoring: Params
) -> dict[str, Any]:
    """Train the DFN filtering network on the trusted pairs (skipped when an open_clip model
    scores the pool: the checkpoint then records why it is empty)."""
    cfg = block(FilterNetworkConfig, filter_network)
    model = block(ScoringConfig, scoring).model
    start = time.perf_counter()
    if model != "filter_network":
        logger.info("train_filter_network: skipped, curation.scoring.model is %s", model)
        return {"config": {"skipped": True, "scoring_model": model}, "state_dict": {},
                "metadata": {"skipped": True, "seconds": 0.0}}
    pairs = (
        (found[1], sample_text(sample) or "")
        for sample in trusted_pairs
        if ERROR_KEY not in sample and (found := image_bytes(sample)) is not None
    )
    checkpoint = train_filter_network(pairs, cfg)
    meta = checkpoint["metadata"]
    _done("train_filter_network", start, "%d pairs, %d steps, loss %.3f -> %.3f",
          meta.get("pairs", 0), meta.get("steps", 0), meta.get("initial_loss", float("nan")),
          meta.get("final_loss", float("nan")))
    return checkpoint


def score_pool(
    raw_pool: ShardSet,
    pool_index: pl.DataFrame,
    filter_network: dict[str, Any],
    clip_score_cache: ShardResultCache,
    scoring: Params,
    nsfw_threshold: float | None,
    index: Params,
    executor: Params,
    progress: bool,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """CLIP score, NSFW score and float16 embeddings of every decodable, captioned sample,
    shard by shard; each finished shard goes to ``clip_score_cache`` (when the model scores in
    this process), so a killed run resumes from the finished shards. Returns clip_scores,
    clip_embeddings and a summary."""
    s = block(ScoringConfig, scoring)
    run_on = block(ExecutorConfig, executor)
    start = time.perf_counter()
    if s.model == "precomputed":
        scores, embeddings = precomputed_scores(pool_index, str(s.score_column))
        summary = {"model": f"precomputed:{s.score_column}", "scored": scores.height,
                   "embed_dim": 0, "nan_scores": int(scores["clip_score"].is_nan().sum())}
        summary["seconds"] = _done("score_pool", start, "%d precomputed scores from %s",
                                   scores.height, s.score_column)
        return scores, embeddings, summary
    result, summary = score_index(
        s.loader(filter_network), raw_pool, pool_index.filter(pl.col("reject_reason").is_null()),
        block(IndexConfig, index), run_on.scoring_batch_size or s.batch_size,
        s.nsfw(nsfw_threshold), cache=clip_score_cache,
        executor=make_executor(run_on, check_progress(progress)), want_gpu=s.device != "cpu",
        progress=progress,
    )
    scores, embeddings = score_tables(result)
    summary.update(scored=scores.height, embed_dim=int(result["image_emb"].shape[1]),
                   nan_scores=int(scores["clip_score"].is_nan().sum()))
    summary["seconds"] = _done("score_pool", start, "%d samples scored with %s on %s",
                               scores.height, summary["model"], summary["executor"])
    return scores, embeddings, summary


def apply_filters(
    pool_index: pl.DataFrame, clip_scores: pl.DataFrame, filters: Params
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """DataComp basic filters and the NSFW cut for every sample the index accepted."""
    start = time.perf_counter()
    decisions = filter_decisions(pool_index, clip_scores, block(FilterConfig, filters))
    counts = dict(decisions.group_by("reject_reason").len().drop_nulls().iter_rows())
    summary: dict[str, Any] = {"checked": int(pool_index["reject_reason"].is_null().sum()), **counts}
    summary["seconds"] = _done("apply_filters", start, "rejected %s", counts)
    return decisions, summary


def deduplicate_pool(
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    clip_embeddings: pl.DataFrame,
    filter_decisions: pl.DataFrame,
    probe_test: ShardSet,
    filter_network: dict[str, Any],
    dedup: Params,
    index: Params,
    scoring: Params,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Eval-leak and duplicate decisions: leaks of ``probe_test`` first, then one representative
    per duplicate cluster among the samples that passed the earlier stages."""
    cfg = block(DedupConfig, dedup)
    start = time.perf_counter()
    pool = dedup_pool(pool_index, clip_scores, filter_decisions)
    embeddings = pool_embeddings(pool, clip_embeddings) if cfg.needs_embeddings else None
    scorer = None
    if cfg.eval_embedding_threshold is not None:
        scorer = block(ScoringConfig, scoring).loader(filter_network)()
    eval_table, eval_embeddings = eval_index(probe_test, block(IndexConfig, index), scorer)
    decisions, summary = deduplicate(pool, embeddings, eval_table, eval_embeddings, cfg)
    summary["eval_images"] = eval_table.height
    summary["seconds"] = _done(
        "deduplicate", start, "%d clusters over %d samples, rejected %d eval leaks and %d "
        "duplicates (%d test images)", summary["clusters"], summary["samples_in_clusters"],
        summary["rejected_eval_leak"], summary["rejected_duplicate"], eval_table.height,
    )
    return decisions, summary


def build_pool_manifest(
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    filter_decisions: pl.DataFrame,
    dedup_decisions: pl.DataFrame,
    filters: Params,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Combine every stage's decision, apply the score cut to the deduplicated survivors, and
    account for every pool sample: input = kept + rejected."""
    start = time.perf_counter()
    manifest, summary = build_manifest(pool_index, clip_scores, filter_decisions,
                                       dedup_decisions, block(FilterConfig, filters))
    summary["seconds"] = _done("build_pool_manifest", start, "%d input = %d kept + %d rejected, "
                               "score cut %s", summary["input"], summary["kept"],
                               summary["rejected"], summary["threshold"])
    return manifest, summary


def export_dfn_uids(pool_manifest: pl.DataFrame) -> np.ndarray:
    """The kept uids in DataComp's subset format (``dfn_uids``): what its resharder reads and
    what ``curation.index.uid_list`` applies to another copy of the pool."""
    kept = pool_manifest.filter(pl.col("kept"))["uid"].to_list()
    other = [uid for uid in kept if not is_hex_uid(uid)]
    if other:
        logger.warning("export_dfn_uids: %d kept uids are not 128-bit hex (e.g. %r): stored as "
                       "their sha256's first 128 bits, which only this project's uid_list "
                       "matches, not DataComp's resharder", len(other), other[0])
    array = to_datacomp(kept)
    logger.info("export_dfn_uids: %d kept uids in DataComp's format", array.size)
    return array


def detect_faces_node(
    raw_pool: ShardSet, pool_manifest: pl.DataFrame, faces: Params, index: Params,
    executor: Params, progress: bool,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Face boxes of every kept sample, shard by shard."""
    detector = block(FacesConfig, faces).make_detector()
    start = time.perf_counter()
    kept = pool_manifest.filter(pl.col("kept")).select("uid", "shard", "key", "position")
    table, summary = detect_faces(detector, raw_pool, kept, block(IndexConfig, index),
                                  _executor(executor, progress))
    summary["seconds"] = _done("detect_faces", start, "%d faces in %d of %d kept images",
                               summary["faces"], summary["images_with_faces"], summary["images"])
    return table, summary


def write_dfn_subset(
    raw_pool: ShardSet,
    pool_manifest: pl.DataFrame,
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    face_boxes: pl.DataFrame,
    subset: Params,
    index: Params,
    executor: Params,
    progress: bool,
) -> tuple[Iterator[Sample], pl.DataFrame]:
    """The curated subset (faces blurred, resized) as a stream for the shard writer, and its
    manifest. ``dfn_manifest.face_boxes`` are in raw-pool pixels; each subset sample's .json has
    them in its own pixels. ``check_dfn_subset`` counts what was written."""
    rows = subset_rows(pool_manifest, pool_index, clip_scores, face_boxes)
    cfg = block(SubsetConfig, subset)
    samples = iter_subset(raw_pool, rows, cfg, block(IndexConfig, index), _executor(executor, progress))
    logger.info("write_dfn_subset: %s", resize_note(pool_index, rows, cfg))
    logger.info("write_dfn_subset: streaming %d samples (%d with faces) to the shard writer",
                rows.height, int((rows["face_count"] > 0).sum()))
    return samples, dfn_manifest(rows)


def check_dfn_subset(
    dfn_subset: ShardSet, dfn_manifest: pl.DataFrame, subset: Params
) -> dict[str, Any]:
    """Read the written subset back against its manifest: samples written, with blurred faces,
    manifest rows missing (undecodable at write time); every written uid is in the manifest.
    The place for checks of the written subset."""
    start = time.perf_counter()
    stats = check_subset(dfn_subset, dfn_manifest, block(SubsetConfig, subset))
    stats["seconds"] = _done(
        "check_dfn_subset", start, "%d of %d samples written (%d with blurred faces, %d "
        "undecodable)", stats["written"], stats["kept"], stats["images_blurred"],
        stats["undecodable"],
    )
    return stats


def report_curation(
    pool_manifest: pl.DataFrame,
    face_boxes: pl.DataFrame,
    sample_truth: pl.DataFrame | None,
    filter_network: dict[str, Any],
    report: Params,
    **stage_stats: dict[str, Any],
) -> dict[str, Any]:
    """The funnel, the score cut, seconds per stage and, when a truth table is given, each
    stage's precision and recall against it; ``stage_stats`` are the stage summaries by node."""
    start = time.perf_counter()
    out = build_report(
        pool_manifest, stage_stats, (filter_network or {}).get("metadata"), sample_truth,
        face_boxes, face_iou=block(ReportConfig, report).face_iou,
    )
    truth = out["truth"] or {}
    _done(
        "report_curation", start, "%d input, %d kept; wrong-caption AUC %s, near-dup recall %s",
        out["funnel"]["input"], out["funnel"]["kept"],
        (truth.get("wrong_caption") or {}).get("roc_auc_clip_score_vs_clean"),
        (truth.get("near_duplicate") or {}).get("detection_recall"),
    )
    return out


def plot_curation(
    pool_manifest: pl.DataFrame,
    curation_report: dict[str, Any],
    raw_pool: ShardSet,
    report: Params,
    index: Params,
) -> tuple[Figure, Figure, Figure]:
    """The funnel per reason, the score histogram with the cut, and kept/rejected thumbnails."""
    cfg = block(ReportConfig, report)
    start = time.perf_counter()
    figures = curation_figures(pool_manifest, curation_report, raw_pool,
                               block(IndexConfig, index), cfg.thumbnails, cfg.histogram_bins)
    _done("plot_curation", start, "3 figures (up to %d+%d thumbnails)", cfg.thumbnails,
          cfg.thumbnails)
    return figures


__all__ = [
    "apply_filters",
    "build_pool_index",
    "build_pool_manifest",
    "check_dfn_subset",
    "check_scoring_model",
    "deduplicate_pool",
    "detect_faces_node",
    "export_dfn_uids",
    "plot_curation",
    "report_curation",
    "score_pool",
    "train_filter_network_node",
    "validate_curation_params",
    "write_dfn_subset",
]
