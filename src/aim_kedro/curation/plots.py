"""The curation figures: the funnel per reason, the score histogram with the cut, and
thumbnails of kept and rejected samples.

Plots are matplotlib ``Figure`` objects built without pyplot, so a catalog dataset can save
them and nothing global changes. Which thumbnails are shown is chosen deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from PIL import Image

from aim_kedro.curation.index import IndexConfig, decode_selected
from aim_kedro.curation.reasons import LOW_CLIP_SCORE
from aim_kedro.io.shards import ShardSet


def score_groups(manifest: pl.DataFrame) -> dict[str, np.ndarray]:
    """clip_scores of the kept samples, of those below the cut, and of those rejected earlier
    (that have a score), for the histogram."""
    cut = pl.col("reject_reason") == LOW_CLIP_SCORE
    return {
        "kept": manifest.filter(pl.col("kept"))["clip_score"].to_numpy(),
        "below the cut": manifest.filter(~pl.col("kept") & cut)["clip_score"].to_numpy(),
        "rejected earlier": manifest.filter(~pl.col("kept") & ~cut)["clip_score"]
        .drop_nulls().to_numpy(),
    }


def thumbnail_rows(manifest: pl.DataFrame, n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Up to ``n`` kept rows (spread over the score range) and ``n`` rejected rows (round-robin
    over reasons, among those a shard holds: a failed download has no picture), chosen
    deterministically."""
    kept = manifest.filter(pl.col("kept")).sort("clip_score", descending=True)
    if kept.height > n:
        picks = np.linspace(0, kept.height - 1, n).round().astype(int)
        kept = kept[np.unique(picks).tolist()]
    rejected = manifest.filter(~pl.col("kept") & pl.col("position").is_not_null()).sort("uid")
    by_reason = [g for _, g in sorted(rejected.partition_by("reject_reason", as_dict=True).items())]
    chosen: list[pl.DataFrame] = []
    for k in range(n):
        for group in by_reason:
            if len(chosen) < n and k < group.height:
                chosen.append(group[k : k + 1])
    rejected = pl.concat(chosen) if chosen else rejected.head(0)
    return kept, rejected


def plot_funnel(report_funnel: dict[str, Any]) -> Figure:
    """Horizontal bars: samples removed per reason, in decision order, and the kept count."""
    labels = ["input"] + [s["stage"] for s in report_funnel["stages"]] + ["kept"]
    values = (
        [report_funnel["input"]]
        + [s["removed"] for s in report_funnel["stages"]]
        + [report_funnel["kept"]]
    )
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#4c72b0"] + ["#c44e52"] * len(report_funnel["stages"]) + ["#55a868"]
    bars = ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("samples")
    ax.set_title("curation funnel: removed per reason, in decision order")
    ax.margins(x=0.15)
    return fig


def plot_score_histogram(
    scores: np.ndarray,
    threshold: float | None,
    groups: dict[str, np.ndarray] | None = None,
    bins: int = 40,
) -> Figure:
    """Histogram of clip_score (split by ``groups`` when given, e.g. truth kinds) with the cut."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    finite = np.asarray(scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size:
        edges = np.histogram_bin_edges(finite, bins=bins)
        if groups:
            for name, values in groups.items():
                values = np.asarray(values, dtype=np.float64)
                values = values[np.isfinite(values)]
                if values.size:
                    ax.hist(values, bins=edges, alpha=0.6, label=f"{name} ({values.size})")
        else:
            ax.hist(finite, bins=edges, alpha=0.8, label=f"scored ({finite.size})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"cut {threshold:.3f}")
    ax.set_xlabel("clip_score (image-caption cosine)")
    ax.set_ylabel("samples")
    ax.set_title("score distribution and the cut")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_thumbnails(
    kept: Sequence[tuple[Image.Image, str]],
    rejected: Sequence[tuple[Image.Image, str]],
    columns: int = 8,
) -> Figure:
    """Two grids of thumbnails with short labels: kept samples above, rejected ones below."""
    rows_kept = max(1, math.ceil(len(kept) / columns))
    rows_rejected = max(1, math.ceil(len(rejected) / columns))
    rows = rows_kept + rows_rejected
    fig = Figure(figsize=(columns * 1.3, rows * 1.5 + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for offset, items, title in ((0, kept, "kept"), (rows_kept, rejected, "rejected")):
        for k, (image, label) in enumerate(items):
            ax = axes[offset + k // columns][k % columns]
            ax.imshow(np.asarray(image.convert("RGB")))
            ax.set_title(label, fontsize=6)
        axes[offset][0].text(
            -0.1, 0.5, title, transform=axes[offset][0].transAxes, rotation=90,
            va="center", ha="right", fontsize=9,
        )
    fig.suptitle("kept (top) and rejected (bottom) samples")
    return fig


def thumbnail_images(
    shards: ShardSet,
    rows: pl.DataFrame,
    index_cfg: IndexConfig,
    label: Callable[[dict[str, Any]], str],
) -> list[tuple[Image.Image, str]]:
    """The decoded images of ``rows`` with ``label(row)``, in the order of ``rows`` (rows whose
    image no longer decodes are left out)."""
    found = {row["uid"]: (image, label(row))
             for row, image in decode_selected(shards, rows, index_cfg) if image is not None}
    return [found[uid] for uid in rows["uid"].to_list() if uid in found]


def _score_text(row: Mapping[str, Any]) -> str:
    return "no score" if row["clip_score"] is None else f"{row['clip_score']:.3f}"


def curation_figures(
    manifest: pl.DataFrame,
    report: Mapping[str, Any],
    shards: ShardSet,
    index_cfg: IndexConfig,
    thumbnails: int = 16,
    bins: int = 40,
) -> tuple[Figure, Figure, Figure]:
    """The funnel of ``report``, the histogram of the manifest's scores with the report's cut,
    and up to ``thumbnails`` kept and rejected thumbnails read from the pool ``shards``."""
    funnel_plot = plot_funnel(report["funnel"])
    histogram = plot_score_histogram(
        manifest["clip_score"].drop_nulls().to_numpy(), report["score_cut"].get("threshold"),
        score_groups(manifest), bins=bins,
    )
    kept, rejected = thumbnail_rows(manifest, thumbnails)
    thumbs = plot_thumbnails(
        thumbnail_images(shards, kept, index_cfg, _score_text),
        thumbnail_images(shards, rejected, index_cfg,
                         lambda r: f"{r['reject_reason']}\n{_score_text(r)}"),
    )
    return funnel_plot, histogram, thumbs


__all__ = [
    "curation_figures",
    "plot_funnel",
    "plot_score_histogram",
    "plot_thumbnails",
    "score_groups",
    "thumbnail_images",
    "thumbnail_rows",
]
