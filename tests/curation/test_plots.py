"""The curation figures: funnel, score histogram with the cut, thumbnails chosen deterministically."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
from conftest import noise_png
from matplotlib.figure import Figure
from PIL import Image

from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.curation.plots import (
    curation_figures,
    plot_funnel,
    plot_score_histogram,
    plot_thumbnails,
    score_groups,
    thumbnail_rows,
)
from aim_kedro.curation.report import funnel
from aim_kedro.io.shards import ShardSet, write_shards


def _png(fig: Figure) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_plots_are_figures_that_render() -> None:
    assert _png(plot_funnel(funnel(_manifest()))).size[0] > 100
    scores = np.random.default_rng(0).normal(0.5, 0.2, 200)
    hist = plot_score_histogram(scores, 0.6, {"kept": scores[:100], "cut": scores[100:]})
    assert any(line.get_xdata()[0] == 0.6 for line in hist.axes[0].lines)
    assert _png(hist).size[0] > 100
    thumb = Image.new("RGB", (16, 16), (255, 0, 0))
    grid = plot_thumbnails([(thumb, "0.9")] * 3, [(thumb, "duplicate")] * 9, columns=4)
    assert len(grid.axes) == (1 + 3) * 4
    assert _png(grid).size[1] > 100


def _manifest(n: int = 12) -> pl.DataFrame:
    reasons = [None, "duplicate", "low_clip_score", None, "corrupt", "low_clip_score"] * (n // 6)
    return pl.DataFrame({
        "uid": [f"u{i:02d}" for i in range(n)],
        "shard": ["shard-000000.tar"] * n,
        "key": [f"k{i:02d}" for i in range(n)],
        "position": list(range(n)),
        "clip_score": [None if r == "corrupt" else 0.05 * i for i, r in enumerate(reasons)],
        "kept": [r is None for r in reasons],
        "reject_reason": reasons,
    }, schema_overrides={"reject_reason": pl.String, "clip_score": pl.Float64})


def test_thumbnails_spread_over_scores_and_reasons() -> None:
    manifest = _manifest(24)
    kept, rejected = thumbnail_rows(manifest, 3)
    scores = kept["clip_score"].to_list()
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert scores[0] == manifest.filter(pl.col("kept"))["clip_score"].max()
    assert rejected["reject_reason"].to_list() == ["corrupt", "duplicate", "low_clip_score"]
    assert thumbnail_rows(manifest, 3)[1].equals(rejected)
    assert thumbnail_rows(manifest, 0)[1].height == 0


def test_score_groups_split_kept_cut_and_earlier() -> None:
    groups = score_groups(_manifest())
    assert len(groups["kept"]) == 4 and len(groups["below the cut"]) == 4
    assert len(groups["rejected earlier"]) == 2  # the duplicates; corrupt rows have no score


def test_curation_figures_read_the_thumbnails_from_the_pool(tmp_path) -> None:
    manifest = _manifest()
    write_shards([{"__key__": k, "png": noise_png(i), "txt": "a picture"}
                  for i, k in enumerate(manifest["key"])], str(tmp_path), samples_per_shard=100)
    pool = ShardSet.open(str(tmp_path))
    index, _ = build_index(pool, IndexConfig(), progress=False)
    assert index["key"].to_list() == manifest["key"].to_list()
    report = {"funnel": funnel(manifest.with_columns(dedup_cluster=pl.lit(None))),
              "score_cut": {"threshold": 0.2}}
    figures = curation_figures(manifest, report, pool, IndexConfig(), thumbnails=2, bins=5)
    assert len(figures) == 3 and all(isinstance(f, Figure) for f in figures)
    titles = [ax.get_title() for ax in figures[2].axes if ax.get_title()]
    assert len(titles) == 4 and any(t.startswith("duplicate") for t in titles)
