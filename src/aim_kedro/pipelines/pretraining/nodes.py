"""Nodes of the ``pretraining`` pipeline: thin glue over ``aim_kedro.aim.train``.

``run_dir`` (a parameter) is scratch state for resuming an interrupted run (``last.pt``, kept
steps); the catalog holds the versioned artifacts this pipeline outputs.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import polars as pl
import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file

from aim_kedro.aim.checkpoint import TrainResult
from aim_kedro.aim.data import split_sources
from aim_kedro.aim.launch import launch_torchrun
from aim_kedro.aim.train import TrainConfig, train
from aim_kedro.io.shards import ShardSet, list_shards

logger = logging.getLogger(__name__)

KNOWN_KEYS = ("run_dir", "num_gpus", "val_percent", "secondary_shards", "secondary_p", "train")
HISTORY_SCHEMA = {
    "step": pl.Int64,
    "train_loss": pl.Float64,
    "val_loss": pl.Float64,
    "lr": pl.Float64,
    "grad_norm": pl.Float64,
    "images_per_s": pl.Float64,
}


def _number(params: dict[str, Any], key: str, default: float, high: float, closed: bool) -> float:
    """A parameter that must be a number in [0, high) (or [0, high] when ``closed``)."""
    value = params.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (0.0 <= value <= high if closed else 0.0 <= value < high):
        bound = f"[0, {high}]" if closed else f"[0, {high})"
        raise ValueError(f"pretraining.{key} must be a number in {bound}, got {value!r}")
    return float(value)


def validate_pretraining_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params:pretraining`` before any work; return the settings the training node uses.

    Each error names the parameter (``pretraining.train.batch_size``, ...) and the fix.
    """
    unknown = sorted(set(params) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"unknown pretraining parameter(s) {unknown}; known: {list(KNOWN_KEYS)}")
    run_dir = params.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ValueError("pretraining.run_dir must be a folder path for the resume state, "
                         "e.g. data/06_models/pretraining_run")
    num_gpus = params.get("num_gpus", 1)
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"pretraining.num_gpus must be an integer >= 1, got {num_gpus!r}")
    train_params = params.get("train")
    if not isinstance(train_params, dict):
        raise ValueError("pretraining.train must be a mapping of training knobs (see TrainConfig)")
    try:
        cfg = TrainConfig.from_dict(dict(train_params))
        cfg.validate(world_size=num_gpus)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"pretraining.train: {exc}") from exc
    if num_gpus > 1 and cfg.device != "cpu" and torch.cuda.is_available():
        if torch.cuda.device_count() < num_gpus:
            raise ValueError(
                f"pretraining.num_gpus={num_gpus} but {torch.cuda.device_count()} GPU(s) are "
                "visible; lower num_gpus"
            )
    val_percent = _number(params, "val_percent", 5.0, 100.0, closed=False)
    if val_percent == 0.0:
        logger.warning("pretraining.val_percent is 0: no validation loss will be recorded")
    secondary = params.get("secondary_shards")
    secondary_p = _number(params, "secondary_p", 0.0, 1.0, closed=True)
    if secondary is not None:
        if not isinstance(secondary, str) or not secondary:
            raise ValueError("pretraining.secondary_shards must be a shard folder path or null")
        try:
            list_shards(secondary)
        except FileNotFoundError as exc:
            raise ValueError(f"pretraining.secondary_shards: {exc}; set it to null or a shard "
                             "folder (e.g. ImageNet shards for the DFN-2B+ mix)") from exc
    return {
        "run_dir": run_dir,
        "num_gpus": num_gpus,
        "val_percent": val_percent,
        "secondary_shards": secondary,
        "secondary_p": secondary_p,
        "train": cfg.to_dict(),
    }


def _history_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        [{k: row.get(k) for k in HISTORY_SCHEMA} for row in rows], schema=HISTORY_SCHEMA
    )


def pretrain_aim(
    dfn_subset: ShardSet | str, settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], pl.DataFrame]:
    """Pre-train on the curated shards (in-process, or under torchrun when ``num_gpus > 1``).

    Returns the final checkpoint, the intermediate checkpoints (read lazily from ``run_dir``)
    and the training history; resumes from ``run_dir/last.pt`` when ``train.resume`` is true.
    """
    shard_set = ShardSet.open(dfn_subset) if isinstance(dfn_subset, str) else dfn_subset
    if not shard_set.shards:
        raise ValueError(f"dfn_subset at {shard_set.path} holds no shards: run the curation pipeline")
    secondary = list_shards(settings["secondary_shards"]) if settings["secondary_shards"] else None
    train_source, val_source = split_sources(
        shard_set.shards, settings["val_percent"], secondary, settings["secondary_p"]
    )
    cfg = TrainConfig.from_dict(settings["train"])
    run_dir = Path(settings["run_dir"])
    if settings["num_gpus"] > 1:
        result = launch_torchrun(cfg, settings["num_gpus"], run_dir, train_source, val_source)
    else:
        result = train(cfg, train_source, val_source, run_dir)
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
    return checkpoint, series, _history_frame(result.history)


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
