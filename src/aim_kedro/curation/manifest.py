"""The pool manifest: every stage's decision joined, the DFN score cut, and the accounting.

Decision order, one reason per sample (the first that applies):
``corrupt``/``no_caption`` (index) -> ``basic_filter`` -> ``nsfw`` -> ``eval_leak`` ->
``duplicate`` -> ``low_clip_score``. Duplicate clusters are built over every decodable sample,
but each cluster's representative is chosen among the samples that survived the earlier stages,
and the score cut then ranks the deduplicated survivors, as DFN ranks a deduplicated pool: a
duplicate never takes a slot of the kept fraction, and a filtered sample never shadows a good
copy of itself. Every pool sample ends kept or rejected with its reason: input = kept + rejected.
Each sample's ``url`` and the extra columns of the pool's sidecars (img2dataset's
``--save_additional_columns``, DataComp's metadata) are carried into both manifests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from aim_kedro.curation.filters import LOW_CLIP_SCORE, FilterConfig, select_by_score
from aim_kedro.curation.index import INDEX_SCHEMA

MANIFEST_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "shard": pl.String(),
    "key": pl.String(),
    "position": pl.UInt32(),
    "clip_score": pl.Float32(),
    "kept": pl.Boolean(),
    "reject_reason": pl.String(),
    "reject_detail": pl.String(),
    "dedup_cluster": pl.Int64(),
    "eval_id": pl.String(),
    "url": pl.String(),
}
"""The manifest's own columns; the pool's extra columns (``extra_columns``) follow."""

DFN_MANIFEST_COLUMNS = (
    "uid", "caption", "clip_score", "nsfw_score", "dedup_cluster", "face_count", "face_boxes",
    "shard", "key", "url",
)


def with_url(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` with a ``url`` column (null where a table from before urls were carried has none)."""
    return table if "url" in table.columns else table.with_columns(url=pl.lit(None, pl.String))


def extra_columns(table: pl.DataFrame) -> list[str]:
    """The columns a pool's sidecars added to ``pool_index`` (and so to the manifests)."""
    return [c for c in table.columns if c not in INDEX_SCHEMA and c not in MANIFEST_SCHEMA]


def _decisions(
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    filter_decisions: pl.DataFrame,
    dedup_decisions: pl.DataFrame,
) -> pl.DataFrame:
    """One row per indexed sample with its score and the first reason of the three stages."""
    return (
        with_url(pool_index).select(
            "uid", "shard", "key", "position", "url", *extra_columns(pool_index),
            pl.col("reject_reason").alias("r0"), pl.col("reject_detail").alias("d0"),
        )
        .join(clip_scores.select("uid", "clip_score"), on="uid", how="left", maintain_order="left")
        .join(
            filter_decisions.select(
                "uid", pl.col("reject_reason").alias("r1"), pl.col("reject_detail").alias("d1")
            ),
            on="uid", how="left", maintain_order="left",
        )
        .join(
            dedup_decisions.select(
                "uid", pl.col("reject_reason").alias("r2"), pl.col("reject_detail").alias("d2"),
                "dedup_cluster", "eval_id",
            ),
            on="uid", how="left", maintain_order="left",
        )
        .with_columns(
            reject_reason=pl.coalesce("r0", "r1", "r2"),
            reject_detail=pl.when(pl.col("r0").is_not_null()).then("d0")
            .when(pl.col("r1").is_not_null()).then("d1")
            .otherwise("d2"),
        )
    )


def build_manifest(
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    filter_decisions: pl.DataFrame,
    dedup_decisions: pl.DataFrame,
    filters: FilterConfig,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Join the stage decisions (index, filters, dedup: the first reason wins), apply the score
    cut (``filters.keep_fraction`` or ``filters.threshold``) to the samples no stage rejected,
    and check the accounting. Returns the manifest (``MANIFEST_SCHEMA``, index order) and a
    summary (input, kept, rejected, the cut). Raises AssertionError when uids repeat across
    the stage tables or a sample ends both kept and rejected, or neither."""
    table = _decisions(pool_index, clip_scores, filter_decisions, dedup_decisions)
    if table.height != pool_index.height:
        raise AssertionError(
            f"manifest has {table.height} rows for {pool_index.height} indexed samples: "
            "uids repeat across the stage tables"
        )
    candidates = table["reject_reason"].is_null().to_numpy()
    scores = table["clip_score"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    keep, threshold = select_by_score(scores[candidates], filters)
    kept = np.zeros(table.height, dtype=bool)
    kept[np.flatnonzero(candidates)[keep]] = True
    cut = candidates & ~kept
    rule = (
        f">= threshold {threshold:g}"
        if filters.threshold is not None
        else f"top {filters.keep_fraction:g} of {int(candidates.sum())}, cut {threshold:.4f}"
    )
    details = [
        f"clip_score {s:.4f} not in {rule}" if c else None for s, c in zip(scores, cut, strict=True)
    ]
    manifest = table.with_columns(
        kept=pl.Series(kept),
        reject_reason=pl.when(pl.Series(cut)).then(pl.lit(LOW_CLIP_SCORE)).otherwise("reject_reason"),
        reject_detail=pl.when(pl.Series(cut)).then(pl.Series(details)).otherwise("reject_detail"),
    ).select(list(MANIFEST_SCHEMA) + extra_columns(pool_index)).cast(MANIFEST_SCHEMA)
    n_kept = int(manifest["kept"].sum())
    n_rejected = int(manifest["reject_reason"].is_not_null().sum())
    if n_kept + n_rejected != pool_index.height or manifest["uid"].n_unique() != manifest.height:
        raise AssertionError(
            f"pool manifest does not add up: {n_kept} kept + {n_rejected} rejected != "
            f"{pool_index.height} input samples (or uids repeat)"
        )
    if manifest.filter(pl.col("kept") == pl.col("reject_reason").is_not_null()).height:
        raise AssertionError("pool manifest: a sample is both kept and rejected, or neither")
    summary = {
        "input": pool_index.height,
        "kept": n_kept,
        "rejected": n_rejected,
        "score_cut_candidates": int(candidates.sum()),
        "threshold": None if not math.isfinite(threshold) else round(float(threshold), 6),
        "threshold_rule": "absolute" if filters.threshold is not None else "keep_fraction",
        "keep_fraction": filters.keep_fraction,
    }
    return manifest, summary


def subset_rows(
    pool_manifest: pl.DataFrame,
    pool_index: pl.DataFrame,
    clip_scores: pl.DataFrame,
    face_boxes: pl.DataFrame,
) -> pl.DataFrame:
    """The kept rows with what the subset writes (caption, scores, cluster, face boxes in raw
    pool pixels, no boxes where no face was found), in manifest order. Raises AssertionError
    when a kept sample has no caption in the index."""
    rows = (
        with_url(pool_manifest).filter(pl.col("kept"))
        .select("uid", "shard", "key", "position", "clip_score", "dedup_cluster", "url",
                *extra_columns(pool_manifest))
        .join(pool_index.select("uid", "caption"), on="uid", how="left", maintain_order="left")
        .join(clip_scores.select("uid", "nsfw_score"), on="uid", how="left", maintain_order="left")
        .join(face_boxes.select("uid", "boxes", "face_count"), on="uid", how="left",
              maintain_order="left")
        .with_columns(
            pl.col("boxes").fill_null(pl.lit([], dtype=pl.List(pl.List(pl.Int32)))),
            pl.col("face_count").fill_null(0),
        )
    )
    missing = rows.filter(pl.col("caption").is_null()).height
    if missing:
        raise AssertionError(f"{missing} kept samples have no caption in pool_index")
    return rows


def dfn_manifest(rows: pl.DataFrame) -> pl.DataFrame:
    """The ``dfn_manifest`` table of ``subset_rows``: ``DFN_MANIFEST_COLUMNS`` and the pool's
    extra columns, face boxes in raw pool pixels (each subset sample's json has them in its
    own pixels)."""
    table = with_url(rows).rename({"boxes": "face_boxes"})
    extras = [c for c in extra_columns(table) if c not in DFN_MANIFEST_COLUMNS]
    return table.select(list(DFN_MANIFEST_COLUMNS) + extras)


__all__ = [
    "DFN_MANIFEST_COLUMNS",
    "MANIFEST_SCHEMA",
    "build_manifest",
    "dfn_manifest",
    "extra_columns",
    "subset_rows",
]
