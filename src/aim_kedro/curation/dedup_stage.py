"""The eval-leak and duplicate stage over the whole pool: gathers what ``dedup.deduplicate``
needs (the candidate table, CLIP embeddings, the evaluation sets' index, embeddings and copy
descriptors, image loaders for verification) and runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import polars as pl

from aim_kedro.curation.copydetect import load_describer
from aim_kedro.curation.dedup import DedupConfig, dedup_pool, deduplicate, pool_embeddings
from aim_kedro.curation.describe import aligned_descriptors, pool_loader
from aim_kedro.curation.eval_leaks import eval_index, eval_loader
from aim_kedro.curation.index import IndexConfig
from aim_kedro.curation.scoring import ClipScorer
from aim_kedro.io.shards import ShardSet


def dedup_stage(
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    clip_embeddings: pl.DataFrame,
    filter_decisions: pl.DataFrame,
    eval_sets: Mapping[str, ShardSet],
    copy_descriptors: pl.DataFrame,
    copy_detector: dict[str, Any] | None,
    raw_pool: ShardSet,
    load_scorer: Callable[[], ClipScorer],
    cfg: DedupConfig,
    index_cfg: IndexConfig,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Decisions and summary of ``deduplicate`` over the samples that passed the earlier
    stages, against ``eval_sets``; ``load_scorer`` is called only when the eval-leak check
    uses embeddings, and copy-detection candidates are verified on images from ``raw_pool``."""
    pool = dedup_pool(pool_index, clip_scores, filter_decisions)
    embeddings = pool_embeddings(pool, clip_embeddings) if cfg.needs_embeddings else None
    scorer = load_scorer() if cfg.eval_embedding_threshold is not None else None
    describer = load_describer(cfg.descriptor, copy_detector) if cfg.describes else None
    evals = eval_index(eval_sets, index_cfg, scorer, describer)
    copy_inputs: dict[str, Any] = {}
    if cfg.describes:
        copy_inputs = {"descriptors": aligned_descriptors(pool["uid"], copy_descriptors),
                       "eval_descriptors": evals.descriptors,
                       "images": pool_loader(raw_pool, pool, index_cfg),
                       "eval_images": eval_loader(eval_sets, index_cfg)}
    decisions, summary = deduplicate(pool, embeddings, evals.table, evals.embeddings, cfg,
                                     **copy_inputs)
    summary["eval_images"] = evals.table.height
    summary["eval_sets"] = list(eval_sets)
    return decisions, summary


__all__ = ["dedup_stage"]
