"""The scoring pass over a pool: every indexed row scored shard by shard, resumable.

The two stage functions run on whichever executor the run uses: ``decode_batches`` (a CPU
step: one shard's rows decoded into batches of records) and ``score_records`` (the model step:
``scoring.score_shard`` on one batch). ``score_index`` runs them over the pool and, when the
model runs in this process, keeps each finished shard in a ``ShardResultCache`` keyed by the
scorer's fingerprint and the shard's rows, so a killed run resumes from its finished shards.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import polars as pl

from aim_kedro.curation.executors import (
    Executor,
    LocalExecutor,
    ModelStage,
    ShardTask,
    shard_tasks,
)
from aim_kedro.curation.index import INDEX_SCHEMA as _INDEX_COLUMNS
from aim_kedro.curation.index import IndexConfig, decode_task
from aim_kedro.curation.resume import (
    ShardResultCache,
    fingerprint,
    rows_fingerprint,
    tensors_fingerprint,
)
from aim_kedro.curation.scoring import (
    SCORE_FIELDS,
    ClipScorer,
    NsfwConfig,
    Record,
    concat_score_parts,
    score_shard,
)
from aim_kedro.io.shards import ShardSet

logger = logging.getLogger(__name__)


def scorer_fingerprint(
    scorer: ClipScorer, nsfw: NsfwConfig, batch_size: int, decode_min_side: int | None = None
) -> str:
    """Identity of everything a score depends on: weights, precision, device type, prompts,
    batch size (batch composition can move float results in the last bits) and the reduced
    decoding (none: the key of a full decode, as before it existed)."""
    reduced = () if decode_min_side is None else (int(decode_min_side),)
    return fingerprint(
        tensors_fingerprint(scorer.model.state_dict()), scorer.precision, scorer.device.type,
        nsfw.nsfw_prompts, nsfw.safe_prompts, int(batch_size), *reduced,
    )


def decode_batches(
    task: ShardTask, index_cfg: IndexConfig, batch_size: int, min_side: int | None = None
) -> Iterator[list[Record]]:
    """Stage function: the rows of one shard (uid, shard, position, key, caption) as
    ``(uid, image, caption)`` records, in batches of ``batch_size`` (the last may be shorter);
    JPEGs decoded at reduced scale with ``min_side`` (``decode_image``)."""
    batch: list[Record] = []
    for row, image in decode_task(task, index_cfg, min_side):
        batch.append((row["uid"], image, row["caption"]))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_records(
    scorer: ClipScorer, records: list[Record], batch_size: int, nsfw: NsfwConfig
) -> dict[str, Any]:
    """Stage function: the ``SCORE_FIELDS`` arrays of one batch of records, and the model name."""
    scored = score_shard(scorer, records, batch_size, nsfw, progress=False)
    return {"model": scorer.model_name, **{name: scored[name] for name in SCORE_FIELDS}}


def _cache_key(model_key: str, task: ShardTask) -> str:
    rows = task.rows
    assert rows is not None
    digest = rows_fingerprint([rows["uid"], rows["position"], rows["key"], rows["caption"]])
    return f"clip_score/{model_key}/{rows['shard'][0]}-{digest}"


def score_index(
    make_scorer: Callable[[], ClipScorer],
    shards: ShardSet,
    index: pl.DataFrame,
    index_cfg: IndexConfig,
    batch_size: int = 256,
    nsfw: NsfwConfig | None = None,
    cache: ShardResultCache | None = None,
    executor: Executor | None = None,
    want_gpu: bool = False,
    progress: bool = True,
    decode_min_side: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Score the rows of ``index`` (columns uid, shard, position, key, caption) shard by shard.

    ``make_scorer`` builds the scorer (it must pickle for Ray, where each actor builds its
    own); records go to it in batches of ``batch_size``. With a ``cache`` and a scorer in this
    process, each shard's result is saved as soon as it is finished and a later call loads it
    instead of scoring it again: a run killed mid-pool resumes where it stopped, with equal
    results. Returns the ``SCORE_FIELDS`` arrays in index order and a summary (model, shards,
    scored_shards, resumed_shards, scoring_batch_size and the executor's description).
    """
    nsfw = nsfw or NsfwConfig()
    executor = executor or LocalExecutor(progress)
    start = time.perf_counter()
    tasks = shard_tasks(shards, index, order="table")
    scorer = executor.model_here(make_scorer) if tasks else make_scorer()
    model_key = None
    if scorer is not None and cache is not None:
        model_key = scorer_fingerprint(scorer, nsfw, batch_size, decode_min_side)
    if cache is not None and model_key is None and tasks:
        logger.info("score pool: the per-shard cache is not used on %r", executor)
    results: dict[int, Mapping[str, np.ndarray]] = {}
    if model_key is not None:
        assert cache is not None
        for task in tasks:
            found = cache.load(_cache_key(model_key, task))
            if found is not None and len(found["uid"]) == task.rows.height:
                results[task.order] = found
    pending = [t for t in tasks if t.order not in results]
    resumed = len(results)
    model = scorer.model_name if scorer is not None else None
    stage = ModelStage(
        make_scorer,
        functools.partial(decode_batches, index_cfg=index_cfg, batch_size=batch_size,
                          min_side=decode_min_side),
        functools.partial(score_records, batch_size=batch_size, nsfw=nsfw),
        want_gpu=want_gpu,
    )
    scored_parts = executor.map_model(stage, pending, desc="score pool")
    for task, parts in zip(pending, scored_parts, strict=True):
        if not parts:
            raise RuntimeError(
                f"{task.path} gave no records for its {task.rows.height} index rows: the pool "
                "changed since pool_index was built; re-run build_pool_index"
            )
        model = model or parts[0]["model"]
        dim = np.asarray(parts[0]["image_emb"]).shape[1]
        result = concat_score_parts(parts, dim)
        if model_key is not None:
            assert cache is not None
            cache.save(_cache_key(model_key, task), result)
        results[task.order] = result
    parts = [results[t.order] for t in tasks]
    dim = scorer.embed_dim if scorer is not None else np.asarray(parts[0]["image_emb"]).shape[1]
    out = concat_score_parts(parts, dim)
    if len(out["uid"]) != index.height:
        raise RuntimeError(f"scored {len(out['uid'])} samples for {index.height} index rows")
    summary: dict[str, Any] = {
        "model": model,
        "shards": len(tasks),
        "scored_shards": len(pending),
        "resumed_shards": resumed,
        "scoring_batch_size": int(batch_size),
        **executor.describe(want_gpu=want_gpu),
    }
    if resumed:
        logger.info("score pool: %d of %d shards resumed from %s, %d scored", resumed,
                    len(tasks), cache, len(pending))
    logger.info("score pool: %d samples of %d shards in %.1f s", index.height, len(tasks),
                time.perf_counter() - start)
    return out, summary


def score_tables(result: Mapping[str, np.ndarray]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``clip_scores`` (uid, clip_score, nsfw_score; float32) and ``clip_embeddings`` (uid,
    image_emb, text_emb; float16 arrays) of ``score_index``'s arrays."""
    uids = pl.Series(result["uid"].tolist(), dtype=pl.String)
    scores = pl.DataFrame({
        "uid": uids,
        "clip_score": pl.Series(result["clip_score"], dtype=pl.Float32),
        "nsfw_score": pl.Series(result["nsfw_score"], dtype=pl.Float32),
    })
    embeddings = pl.DataFrame({
        "uid": uids,
        "image_emb": pl.Series(result["image_emb"].astype(np.float16)),
        "text_emb": pl.Series(result["text_emb"].astype(np.float16)),
    })
    return scores, embeddings


def precomputed_scores(index: pl.DataFrame, column: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``clip_scores`` and ``clip_embeddings`` when the pool's sidecars carry the score (DataComp's
    ``clip_l14_similarity_score``): ``column`` of the rows no earlier stage rejected becomes
    ``clip_score`` (a missing value is NaN, never kept); no NSFW score, no embeddings. Raises
    ValueError naming ``curation.scoring.score_column`` when the index has no such column."""
    if column not in index.columns:
        raise ValueError(
            f"curation.scoring.score_column={column!r} is not a column of pool_index: the pool's "
            f"parquet sidecars give {[c for c in index.columns if c not in _INDEX_COLUMNS]} "
            "(pool_index keeps every sidecar column beyond img2dataset's own)"
        )
    rows = index.filter(pl.col("reject_reason").is_null())
    try:
        values = rows[column].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    except pl.exceptions.InvalidOperationError as exc:
        raise ValueError(f"curation.scoring.score_column={column!r} is not numeric: {exc}") from exc
    n = rows.height
    return score_tables({
        "uid": rows["uid"].to_numpy(),
        "clip_score": values.astype(np.float32),
        "nsfw_score": np.full(n, np.nan, dtype=np.float32),
        "image_emb": np.zeros((n, 0), dtype=np.float16),
        "text_emb": np.zeros((n, 0), dtype=np.float16),
    })


def _counted(summary: dict[str, Any], scores: pl.DataFrame, embed_dim: int) -> dict[str, Any]:
    summary.update(scored=scores.height, embed_dim=embed_dim,
                   nan_scores=int(scores["clip_score"].is_nan().sum()))
    return summary


def precomputed_stage(
    index: pl.DataFrame, column: str
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """``precomputed_scores`` and their summary (scored, embed_dim 0, nan_scores)."""
    scores, embeddings = precomputed_scores(index, column)
    return scores, embeddings, _counted({"model": f"precomputed:{column}"}, scores, 0)


def score_pool_stage(
    make_scorer: Callable[[], ClipScorer], shards: ShardSet, pool_index: pl.DataFrame,
    index_cfg: IndexConfig, batch_size: int, nsfw: NsfwConfig | None, **options: Any,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """``score_index`` over the rows no earlier stage rejected (``options`` are its keywords),
    as ``clip_scores``, ``clip_embeddings`` and a summary (scored, embed_dim, nan_scores)."""
    rows = pool_index.filter(pl.col("reject_reason").is_null())
    result, summary = score_index(make_scorer, shards, rows, index_cfg, batch_size, nsfw, **options)
    scores, embeddings = score_tables(result)
    return scores, embeddings, _counted(summary, scores, int(result["image_emb"].shape[1]))


__all__ = [
    "decode_batches",
    "precomputed_scores",
    "precomputed_stage",
    "score_index",
    "score_pool_stage",
    "score_records",
    "score_tables",
    "scorer_fingerprint",
]
