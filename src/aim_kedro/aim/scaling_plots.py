"""Figures of the scaling study in the paper's style (its Fig. 4): validation loss against trunk
parameters with a line per data size, probe top-1 against parameters, and validation loss over
training per capacity. Lines are means over seeds; every seed's run is a small dot (or a band).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl
from matplotlib import colormaps, ticker
from matplotlib.figure import Figure

from aim_kedro.aim.scaling import by_size, low_shot_column


def _colours(names: list[str], cmap: str = "viridis") -> dict[str, Any]:
    palette = colormaps[cmap]
    return {name: palette(0.15 + 0.7 * i / max(len(names) - 1, 1)) for i, name in enumerate(names)}


def _seed_means(results: pl.DataFrame, value: str) -> pl.DataFrame:
    return (results.group_by("capacity", "data")
            .agg(pl.col("trunk_params", "train_images").first(), pl.col(value).mean().alias("mean"),
                 pl.col(value).min().alias("low"), pl.col(value).max().alias("high"))
            .sort("trunk_params"))


def _count(value: float) -> str:
    """51k, 1.1M, 6.4B."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:g}"


def _params_axis(ax: Any, results: pl.DataFrame, log_y: bool = False) -> None:
    """A log x axis of trunk parameters ticked at the capacities; a log y in plain numbers."""
    ax.set_xscale("log")
    params = sorted(by_size(results, "capacity", "trunk_params").values())
    ax.set_xticks(params, [_count(p) for p in params])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("trunk parameters")
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2f"))


def _data_label(results: pl.DataFrame, data: str) -> str:
    images = results.filter(pl.col("data") == data)["train_images"][0]
    return f"{data} ({images:,} images)"


def plot_loss_vs_params(results: pl.DataFrame, summary: Mapping[str, Any]) -> Figure:
    """Final validation loss against trunk parameters (log-log), a line per data size, with the
    fitted power law of each (dashed) and its exponent in the legend."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    sizes = list(by_size(results, "data", "train_images"))
    colours = _colours(sizes)
    means = _seed_means(results, "final_val_loss")
    for data in sizes:
        rows = means.filter(pl.col("data") == data)
        runs = results.filter(pl.col("data") == data)
        fit = (summary.get("loss_vs_params") or {}).get(data) or {}
        label = _data_label(results, data)
        if fit.get("exponent") is not None:
            label += f": L ~ N^-{fit['exponent']:.3f} (R² {fit['r2']:.2f})"
            xs = np.geomspace(rows["trunk_params"].min(), rows["trunk_params"].max(), 50)
            ax.plot(xs, fit["coefficient"] * xs ** -fit["exponent"], "--", color=colours[data],
                    alpha=0.6)
        ax.plot(rows["trunk_params"], rows["mean"], "o-", color=colours[data], label=label)
        ax.scatter(runs["trunk_params"], runs["final_val_loss"], s=10, color=colours[data],
                   alpha=0.5)
    _params_axis(ax, results, log_y=True)
    ax.set_ylabel("final validation loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Validation loss vs capacity ({summary.get('budget', '')}, "
                 f"{', '.join(map(str, summary.get('steps', [])))} steps)")
    return fig


def plot_probes_vs_params(results: pl.DataFrame) -> Figure:
    """Test top-1 of the attentive low-shot, attentive and linear probes against trunk
    parameters, a line per data size; the random-init trunk of each capacity in grey."""
    probes = [low_shot_column(results), "attentive_top1", "linear_top1"]
    probes = [p for p in probes if p in results.columns]
    fig = Figure(figsize=(4.2 * len(probes), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(probes)))
    sizes = list(by_size(results, "data", "train_images"))
    colours = _colours(sizes)
    for ax, probe in zip(axes, probes, strict=True):
        means = _seed_means(results, probe)
        for data in sizes:
            rows = means.filter(pl.col("data") == data)
            ax.errorbar(rows["trunk_params"], 100 * rows["mean"],
                        yerr=[100 * (rows["mean"] - rows["low"]), 100 * (rows["high"] - rows["mean"])],
                        fmt="o-", capsize=3, color=colours[data], label=_data_label(results, data))
        if f"random_{probe}" in results.columns:
            base = (results.group_by("capacity")
                    .agg(pl.col("trunk_params").first(), pl.col(f"random_{probe}").mean())
                    .sort("trunk_params"))
            ax.plot(base["trunk_params"], 100 * base[f"random_{probe}"], "s--", color="tab:gray",
                    label="random-init trunk")
        _params_axis(ax, results)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(re.sub(r"(\d+)shot", r"\1-shot", probe.removesuffix("_top1")).replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Frozen-trunk probes vs capacity (mean over seeds, bars: min-max)")
    return fig


def plot_loss_curves(curves: pl.DataFrame, results: pl.DataFrame) -> Figure:
    """Validation loss over pre-training, a line per capacity (mean over seeds, band: min-max),
    one panel per data size; the y axis starts at the second validation, where they part."""
    sizes = list(by_size(results, "data", "train_images"))
    params = by_size(results, "capacity", "trunk_params")
    capacities = list(params)
    colours = _colours(capacities, "plasma")
    fig = Figure(figsize=(4.2 * len(sizes), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(sizes), sharey=True))
    steps = sorted(set(curves["step"].to_list()))
    later = curves.filter(pl.col("step") >= steps[min(1, len(steps) - 1)])["val_loss"]
    for ax, data in zip(axes, sizes, strict=True):
        for capacity in capacities:
            rows = (curves.filter((pl.col("data") == data) & (pl.col("capacity") == capacity))
                    .group_by("step").agg(pl.col("val_loss").mean().alias("mean"),
                                          pl.col("val_loss").min().alias("low"),
                                          pl.col("val_loss").max().alias("high"))
                    .sort("step"))
            if not rows.height:
                continue
            ax.plot(rows["step"], rows["mean"], color=colours[capacity],
                    label=f"{capacity} ({_count(params[capacity])})")
            ax.fill_between(rows["step"], rows["low"], rows["high"], color=colours[capacity],
                            alpha=0.2)
        ax.set_ylim(0.98 * later.min(), 1.02 * later.max())
        ax.set_xlabel("pre-training step")
        ax.set_title(_data_label(results, data))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[-1].legend(fontsize=8, title="trunk parameters")
    fig.suptitle("Validation loss over pre-training per capacity")
    return fig


__all__ = ["plot_loss_curves", "plot_loss_vs_params", "plot_probes_vs_params"]
