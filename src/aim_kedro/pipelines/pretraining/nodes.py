"""Nodes of the ``pretraining`` pipeline: thin glue over ``aim_kedro.aim`` (train, launch).

The run directory (resume state, kept steps) is the catalog entry ``pretraining_run``, the
optional mixed-in shards ``secondary_pool``; the versioned artifacts are this pipeline's outputs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import polars as pl
from matplotlib.figure import Figure
from safetensors.torch import load_file

from aim_kedro.aim.checkpoint import RunDir, TrainResult
from aim_kedro.aim.configs import PretrainingConfig
from aim_kedro.aim.data import split_sources
from aim_kedro.aim.launch import launch_torchrun
from aim_kedro.aim.train import train
from aim_kedro.io.shards import ShardSet

logger = logging.getLogger(__name__)

HISTORY_SCHEMA = {
    "step": pl.Int64,
    "train_loss": pl.Float64,
    "val_loss": pl.Float64,
    "lr": pl.Float64,
    "grad_norm": pl.Float64,
    "images_per_s": pl.Float64,
}


def validate_pretraining_params(params: dict[str, Any]) -> PretrainingConfig:
    """Check ``params:pretraining`` before any work; return the typed config the training node uses.

    Each error names the parameter (``pretraining.train.batch_size``, ...) and the fix.
    """
    return PretrainingConfig.from_params(params)


def _shard_set(shards: ShardSet | str) -> ShardSet:
    return ShardSet.open(shards) if isinstance(shards, str) else shards


def pretrain_aim(
    dfn_subset: ShardSet | str,
    secondary_pool: ShardSet | str,
    pretraining_run: RunDir,
    settings: PretrainingConfig,
) -> tuple[dict[str, Any], dict[str, Any], pl.DataFrame]:
    """Pre-train on the curated shards (in-process, or under torchrun when ``num_gpus > 1``),
    mixing in ``secondary_pool`` with probability ``secondary_p`` when it holds shards.

    Returns the final checkpoint, the intermediate checkpoints (read lazily from the run
    directory) and the training history; resumes from the run directory's ``last.pt`` when
    ``train.resume`` is true.
    """
    shard_set = _shard_set(dfn_subset)
    if not shard_set.shards:
        raise ValueError(f"dfn_subset at {shard_set.path} holds no shards: run the curation pipeline")
    secondary = _shard_set(secondary_pool).shards
    if secondary:
        logger.info("pretrain_aim: mixing in %d secondary shard(s) with p=%g", len(secondary),
                    settings.secondary_p)
    train_source, val_source = split_sources(
        shard_set.shards, settings.val_percent, secondary or None, settings.secondary_p
    )
    if settings.num_gpus > 1:
        result = launch_torchrun(settings.train, settings.num_gpus, pretraining_run, train_source,
                                 val_source)
    else:
        result = train(settings.train, train_source, val_source, pretraining_run)
    return _outputs(result)


def _outputs(result: TrainResult) -> tuple[dict[str, Any], dict[str, Any], pl.DataFrame]:
    metadata = {**result.metadata, "step": result.metadata["steps"]}
    checkpoint = {"config": result.config, "state_dict": result.state_dict, "metadata": metadata}
    series = {
        "config": result.config,
        "checkpoints": {
            step: functools.partial(load_file, path) for step, path in result.intermediate.items()
        },
    }
    history = pl.DataFrame(
        [{k: row.get(k) for k in HISTORY_SCHEMA} for row in result.history], schema=HISTORY_SCHEMA
    )
    return checkpoint, series, history


def plot_loss_curve(training_history: pl.DataFrame) -> Figure:
    """Training and validation loss against step (log scale), with the learning rate beside."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    trained = training_history.filter(pl.col("train_loss").is_not_null())
    validated = training_history.filter(pl.col("val_loss").is_not_null())
    ax.plot(trained["step"], trained["train_loss"], label="train loss", color="tab:blue")
    ax.plot(validated["step"], validated["val_loss"], "o-", label="val loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("pixel loss (normalised patches)")
    if len(trained) + len(validated) and min(
        [*trained["train_loss"].to_list(), *validated["val_loss"].to_list()]
    ) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    lr = training_history.filter(pl.col("lr").is_not_null())
    twin = ax.twinx()
    twin.plot(lr["step"], lr["lr"], color="tab:gray", alpha=0.5, linestyle="--", label="lr")
    twin.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    if len(validated):
        first, last = validated["val_loss"][0], validated["val_loss"][-1]
        ax.set_title(f"AIM pre-training: val loss {first:.3f} -> {last:.3f}")
    else:
        ax.set_title("AIM pre-training")
    fig.tight_layout()
    return fig
