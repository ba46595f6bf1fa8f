"""Nodes of the ``curation`` pipeline: thin glue between the catalog and ``aim_kedro.curation``.

Each node takes the parameter blocks it uses (``params:curation.dedup``, ...) and builds their
typed configs (cheap); the run hook checks the whole ``params:curation`` tree once, before the
first node, with ``validate_curation_params``. Per-shard stages run on ``curation.executor``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
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
from aim_kedro.curation.copydetect import train_copy_detector
from aim_kedro.curation.dedup import DedupConfig
from aim_kedro.curation.dedup_stage import dedup_stage
from aim_kedro.curation.describe import describe_pool_stage, training_images
from aim_kedro.curation.executors import ExecutorConfig, make_executor
from aim_kedro.curation.face_stage import detect_faces, drop_unchecked, kept_face_rows
from aim_kedro.curation.filter_network import FilterNetworkConfig, train_filter_network
from aim_kedro.curation.filters import FilterConfig, filter_decisions, filter_summary
from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.curation.manifest import build_manifest, dfn_manifest, subset_rows
from aim_kedro.curation.nsfw import NsfwClassifierConfig, score_nsfw
from aim_kedro.curation.plots import curation_figures
from aim_kedro.curation.pool_scoring import precomputed_stage, score_pool_stage
from aim_kedro.curation.report import build_report
from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.curation.subset import SubsetConfig, check_subset, subset_stream
from aim_kedro.io.shards import Sample, ShardSet, image_text_pairs
from aim_kedro.io.uids import export_uids

logger = logging.getLogger(__name__)

Params = Mapping[str, Any]  # a parameter block (``params:curation.<block>``)


def _done(node: str, start: float, message: str, *args: Any) -> float:
    seconds = time.perf_counter() - start
    logger.info(f"{node}: {message} in %.1f s", *args, seconds)
    return round(seconds, 3)


def _timed(node: str, start: float, summary: dict, message: str, *keys: str) -> dict:
    """``summary`` with its node's seconds, logged with the values of ``keys``."""
    summary["seconds"] = _done(node, start, message, *(summary[key] for key in keys))
    return summary


def _executor(executor: Params | None, progress: bool) -> Any:
    return make_executor(block(ExecutorConfig, executor), check_progress(progress))


def _skipped(node: str, because: str, **why: Any) -> dict[str, Any]:
    """The empty checkpoint of a training node that did not train, saying why (and logging it)."""
    logger.info("%s: skipped, %s", node, because)
    return {"config": {"skipped": True, **why}, "state_dict": {},
            "metadata": {"skipped": True, "seconds": 0.0}}


def _trained(node: str, start: float, checkpoint: dict, what: str) -> dict[str, Any]:
    """Log what a training node trained on (``what``: the metadata's count key) and how."""
    meta, nan = checkpoint["metadata"], float("nan")
    _done(node, start, f"%d {what}, %d steps, loss %.3f -> %.3f", meta.get(what, 0),
          meta.get("steps", 0), meta.get("initial_loss", nan), meta.get("final_loss", nan))
    return checkpoint


def build_pool_index(
    raw_pool: ShardSet, index: Params, executor: Params, progress: bool
) -> tuple[pl.DataFrame, dict]:
    """Decode every pool sample safely and index it (sizes, hashes, caption, reject reason)."""
    start = time.perf_counter()
    table, summary = build_index(raw_pool, block(IndexConfig, index), _executor(executor, progress))
    return table, _timed("build_pool_index", start, summary, "%d samples in %d shards, %d valid, "
                         "rejected %s", "samples", "shards", "valid", "rejected")


def train_filter_network_node(
    trusted_pairs: ShardSet, filter_network: Params, scoring: Params
) -> dict[str, Any]:
    """Train the DFN filtering network on the trusted pairs (unless another model scores)."""
    cfg = block(FilterNetworkConfig, filter_network)
    model = block(ScoringConfig, scoring).model
    start = time.perf_counter()
    if model != "filter_network":
        return _skipped("train_filter_network", f"curation.scoring.model is {model}",
                        scoring_model=model)
    checkpoint = train_filter_network(image_text_pairs(trusted_pairs), cfg)
    return _trained("train_filter_network", start, checkpoint, "pairs")


def score_pool(
    raw_pool: ShardSet, pool_index: pl.DataFrame, filter_network: dict[str, Any],
    clip_score_cache: ShardResultCache, scoring: Params, nsfw_threshold: float | None,
    index: Params, executor: Params, progress: bool,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """CLIP and NSFW scores and embeddings of every sample; resumes from ``clip_score_cache``."""
    s = block(ScoringConfig, scoring)
    run_on = block(ExecutorConfig, executor)
    start = time.perf_counter()
    if s.model == "precomputed":
        scores, embeddings, summary = precomputed_stage(pool_index, str(s.score_column))
        return scores, embeddings, _timed("score_pool", start, summary,
                                          "%d scores from %s", "scored", "model")
    scores, embeddings, summary = score_pool_stage(
        s.loader(filter_network), raw_pool, pool_index, block(IndexConfig, index),
        run_on.scoring_batch_size or s.batch_size, s.nsfw(nsfw_threshold), cache=clip_score_cache,
        executor=make_executor(run_on, check_progress(progress)), want_gpu=s.device != "cpu",
        progress=progress, decode_min_side=s.decode_min_side,
    )
    return scores, embeddings, _timed("score_pool", start, summary,
                                      "%d samples scored with %s on %s", "scored", "model",
                                      "executor")


def score_nsfw_node(
    raw_pool: ShardSet, pool_index: pl.DataFrame, nsfw: Params, index: Params,
    executor: Params, progress: bool,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The NSFW classifier's score of every decodable, captioned sample, shard by shard."""
    classifier = block(NsfwClassifierConfig, nsfw).make_classifier()
    start = time.perf_counter()
    rows = pool_index.filter(pl.col("reject_reason").is_null()).select(
        "uid", "shard", "key", "position")
    table, summary = score_nsfw(classifier, raw_pool, rows, block(IndexConfig, index),
                                _executor(executor, progress))
    return table, _timed("score_nsfw", start, summary, "%d samples scored by %s", "scored",
                         "classifier")


def apply_filters(
    pool_index: pl.DataFrame, clip_scores: pl.DataFrame, nsfw_scores: pl.DataFrame,
    filters: Params,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """DataComp basic filters and the NSFW cuts for every sample the index accepted."""
    start = time.perf_counter()
    decisions = filter_decisions(pool_index, clip_scores, block(FilterConfig, filters), nsfw_scores)
    summary = filter_summary(pool_index, decisions)
    summary["seconds"] = _done("apply_filters", start, "rejected %s",
                               {k: v for k, v in summary.items() if k != "checked"})
    return decisions, summary


def train_copy_detector_node(
    raw_pool: ShardSet, pool_index: pl.DataFrame, dedup: Params, index: Params, progress: bool
) -> dict[str, Any]:
    """Train the SSCD-style copy detector on the pool's decodable images (unless not needed)."""
    cfg = block(DedupConfig, dedup)
    start = time.perf_counter()
    if not cfg.describes or not cfg.descriptor.trains:
        why = "copy detection is off" if not cfg.describes else f"uses {cfg.descriptor.path}"
        return _skipped("train_copy_detector", f"curation.dedup {why}", reason=why)
    images = training_images(raw_pool, pool_index, cfg.descriptor, block(IndexConfig, index))
    checkpoint = train_copy_detector(images, cfg.descriptor, check_progress(progress))
    return _trained("train_copy_detector", start, checkpoint, "images")


def describe_pool(
    raw_pool: ShardSet, pool_index: pl.DataFrame, copy_detector: dict[str, Any], dedup: Params,
    index: Params, executor: Params, progress: bool,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Copy descriptors of every decodable pool sample (empty when copy detection is off)."""
    cfg = block(DedupConfig, dedup)
    start = time.perf_counter()
    table, summary = describe_pool_stage(
        raw_pool, pool_index, cfg.descriptor, copy_detector, block(IndexConfig, index),
        _executor(executor, progress), enabled=cfg.describes, progress=check_progress(progress),
    )
    if cfg.describes:
        _timed("describe_pool", start, summary, "%d descriptors (dim %d)", "described", "dim")
    return table, summary


def deduplicate_pool(
    pool_index: pl.DataFrame, clip_scores: pl.DataFrame, clip_embeddings: pl.DataFrame,
    filter_decisions: pl.DataFrame, probe_test: ShardSet, eval_leak_sets: dict[str, Any],
    copy_descriptors: pl.DataFrame, copy_detector: dict[str, Any], raw_pool: ShardSet,
    filter_network: dict[str, Any], dedup: Params, index: Params, scoring: Params,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Eval-leak (``probe_test``, ``eval_leak_sets``) and duplicate decisions of the pool."""
    start = time.perf_counter()
    decisions, summary = dedup_stage(
        pool_index, clip_scores, clip_embeddings, filter_decisions,
        {"probe_test": probe_test, **(eval_leak_sets or {})}, copy_descriptors, copy_detector,
        raw_pool, lambda: block(ScoringConfig, scoring).loader(filter_network)(),
        block(DedupConfig, dedup), block(IndexConfig, index),
    )
    return decisions, _timed(
        "deduplicate", start, summary, "%d clusters over %d samples, rejected %d eval leaks and "
        "%d duplicates (%d test images)", "clusters", "samples_in_clusters", "rejected_eval_leak",
        "rejected_duplicate", "eval_images")


def build_pool_manifest(
    pool_index: pl.DataFrame, clip_scores: pl.DataFrame, filter_decisions: pl.DataFrame,
    dedup_decisions: pl.DataFrame, filters: Params,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Every stage's decision and the score cut: input = kept + rejected."""
    start = time.perf_counter()
    manifest, summary = build_manifest(pool_index, clip_scores, filter_decisions,
                                       dedup_decisions, block(FilterConfig, filters))
    return manifest, _timed("build_pool_manifest", start, summary, "%d input = %d kept + %d "
                            "rejected, score cut %s", "input", "kept", "rejected", "threshold")


def export_dfn_uids(pool_manifest: pl.DataFrame) -> np.ndarray:
    """The kept uids in DataComp's subset format (what ``curation.index.uid_list`` reads)."""
    array = export_uids(pool_manifest.filter(pl.col("kept"))["uid"].to_list())
    logger.info("export_dfn_uids: %d kept uids in DataComp's format", array.size)
    return array


def detect_faces_node(
    raw_pool: ShardSet, pool_manifest: pl.DataFrame, pool_index: pl.DataFrame, faces: Params,
    index: Params, executor: Params, progress: bool,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Face boxes of every kept sample (with the pool's sidecar ``face_bboxes`` if any)."""
    cfg = block(FacesConfig, faces)
    detector = cfg.make_detector()
    start = time.perf_counter()
    table, summary = detect_faces(detector, raw_pool, kept_face_rows(pool_manifest, pool_index),
                                  block(IndexConfig, index), _executor(executor, progress),
                                  policy=cfg.policy())
    return table, _timed("detect_faces", start, summary, "%d faces in %d of %d kept images (%d "
                         "unchecked)", "faces", "images_with_faces", "images", "unchecked")


def write_dfn_subset(
    raw_pool: ShardSet, pool_manifest: pl.DataFrame, pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame, face_boxes: pl.DataFrame, subset: Params, index: Params,
    executor: Params, progress: bool,
) -> tuple[Iterator[Sample], pl.DataFrame]:
    """The curated subset (faces blurred, resized) as a stream for the shard writer, and its
    manifest (face boxes in raw-pool pixels; each sample's .json has them in its own)."""
    rows = drop_unchecked(subset_rows(pool_manifest, pool_index, clip_scores, face_boxes),
                          face_boxes)
    samples = subset_stream(raw_pool, rows, pool_index, block(SubsetConfig, subset),
                            block(IndexConfig, index), _executor(executor, progress))
    return samples, dfn_manifest(rows)


def check_dfn_subset(
    dfn_subset: ShardSet, dfn_manifest: pl.DataFrame, subset: Params, faces: Params,
    report: Params,
) -> dict[str, Any]:
    """Count the written subset against its manifest, and blurred faces still detected."""
    start = time.perf_counter()
    stats = check_subset(dfn_subset, dfn_manifest, block(SubsetConfig, subset),
                         block(FacesConfig, faces).make_detector(),
                         iou=block(ReportConfig, report).face_iou)
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return stats


def report_curation(
    pool_manifest: pl.DataFrame, face_boxes: pl.DataFrame, sample_truth: pl.DataFrame | None,
    filter_network: dict[str, Any], report: Params, **stage_stats: dict[str, Any],
) -> dict[str, Any]:
    """The funnel, the score cut, seconds per stage and, when a truth table is given, each
    stage's precision and recall against it; ``stage_stats`` are the stage summaries by node."""
    return build_report(pool_manifest, stage_stats, (filter_network or {}).get("metadata"),
                        sample_truth, face_boxes, face_iou=block(ReportConfig, report).face_iou)


def plot_curation(
    pool_manifest: pl.DataFrame, curation_report: dict[str, Any], raw_pool: ShardSet,
    report: Params, index: Params,
) -> tuple[Figure, Figure, Figure]:
    """The funnel per reason, the score histogram with the cut, and kept/rejected thumbnails."""
    cfg = block(ReportConfig, report)
    start = time.perf_counter()
    figures = curation_figures(pool_manifest, curation_report, raw_pool,
                               block(IndexConfig, index), cfg.thumbnails, cfg.histogram_bins)
    _done("plot_curation", start, "3 figures (up to %d+%d thumbnails)", *[cfg.thumbnails] * 2)
    return figures


__all__ = [
    "apply_filters", "build_pool_index", "build_pool_manifest", "check_dfn_subset",
    "check_scoring_model", "deduplicate_pool", "describe_pool", "detect_faces_node",
    "export_dfn_uids", "plot_curation", "report_curation", "score_nsfw_node", "score_pool",
    "train_copy_detector_node", "train_filter_network_node", "validate_curation_params",
    "write_dfn_subset",
]
