"""Studies: validation loss against probe accuracy of a run's checkpoints, and scaling fits.

The paper's claim (its Fig. 1, right) is that the pre-training objective tracks downstream
quality. Here, for each kept step: the validation loss from the training history, and the test
top-1 of a cheap fixed-lr probe on that step's frozen features; the summary is Spearman's rho.
The labelled images are decoded once and only the images the probes use go through each trunk.

The scaling study (the paper's first finding, its Fig. 4): over a grid of capacities and data
sizes (``aim.scaling``), power laws of the final validation loss against trunk parameters and
against training images, and Spearman's rho of loss with probe top-1 over every run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy.stats import spearmanr
from torch import Tensor
from tqdm.auto import tqdm

from aim_kedro.aim.configs import FeaturesConfig, LossVsAccuracyConfig, ProbesConfig
from aim_kedro.aim.data import eval_transform
from aim_kedro.aim.evalsets import LabelledSet
from aim_kedro.aim.features import (
    extract_features,
    image_batches,
    resolve_layers,
    trunk_from_state_dict,
)
from aim_kedro.aim.presets import AIMConfig
from aim_kedro.aim.probes import FeatureSplit, few_shot_indices, fixed_lr_probe_top1
from aim_kedro.aim.scaling import by_size, low_shot_column
from aim_kedro.common.training import cpu_threads

logger = logging.getLogger(__name__)

TABLE_SCHEMA = {"step": pl.Int64, "val_loss": pl.Float64, "top1": pl.Float64}
Batches = list[tuple[Tensor, Tensor]]


def pick_steps(steps: Sequence[int], max_checkpoints: int | None) -> list[int]:
    """At most ``max_checkpoints`` steps, evenly spaced over ``steps`` (first and last kept)."""
    steps = sorted(steps)
    if not max_checkpoints or len(steps) <= max_checkpoints:
        return steps
    if max_checkpoints == 1:
        return [steps[-1]]
    picks = {round(i * (len(steps) - 1) / (max_checkpoints - 1)) for i in range(max_checkpoints)}
    return [steps[i] for i in sorted(picks)]


def val_loss_at(history: pl.DataFrame, step: int) -> float | None:
    """The validation loss the history holds for ``step`` (its last one), or None."""
    rows = history.filter((pl.col("step") == step) & pl.col("val_loss").is_not_null())
    return float(rows["val_loss"][-1]) if rows.height else None


def decode_labelled(labelled: LabelledSet, img_size: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Every image of ``labelled`` in the evaluation view, ``(images [N, C, H, W], labels [N])``."""
    batches = list(image_batches(labelled, eval_transform(img_size), batch_size))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _batched(images: Tensor, labels: Tensor, batch_size: int) -> Batches:
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def _probe_images(
    eval_sets: Mapping[str, LabelledSet], img_size: int, batch_size: int, shots: int | None,
    seeds: Sequence[int],
) -> tuple[dict[str, Batches], list[Tensor] | None]:
    """The decoded train/test batches the probes see and, with ``shots``, the low-shot draws as
    rows of the kept training images (only the drawn images need features)."""
    train_images, train_labels = decode_labelled(eval_sets["train"], img_size, batch_size)
    test_images, test_labels = decode_labelled(eval_sets["test"], img_size, batch_size)
    draws = None
    if shots is not None:
        full_draws = [few_shot_indices(train_labels, shots, seed) for seed in seeds]
        used = torch.unique(torch.cat(full_draws))
        draws = [torch.searchsorted(used, d) for d in full_draws]
        train_images, train_labels = train_images[used], train_labels[used]
    splits = {"train": _batched(train_images, train_labels, batch_size),
              "test": _batched(test_images, test_labels, batch_size)}
    return splits, draws


def spearman(table: pl.DataFrame) -> tuple[float | None, float | None]:
    """Spearman's rho (and p-value) of ``val_loss`` against ``top1``; None below 3 rows or
    when either column is constant (rho is undefined)."""
    if table.height < 3:
        logger.warning("loss_vs_accuracy: %d checkpoint(s) with a val_loss, Spearman needs >= 3",
                       table.height)
        return None, None
    if min(table["val_loss"].n_unique(), table["top1"].n_unique()) < 2:
        logger.warning("loss_vs_accuracy: val_loss or top1 is constant, Spearman is undefined")
        return None, None
    result = spearmanr(table["val_loss"].to_numpy(), table["top1"].to_numpy())
    rho, p_value = float(result.statistic), float(result.pvalue)
    return (None if math.isnan(rho) else rho), (None if math.isnan(p_value) else p_value)


def loss_vs_accuracy(
    cfg: AIMConfig,
    steps: Sequence[int],
    load_step: Callable[[int], Mapping[str, Tensor]],
    history: pl.DataFrame,
    eval_sets: Mapping[str, LabelledSet],
    study: LossVsAccuracyConfig,
    features: FeaturesConfig,
    probes: ProbesConfig,
    device: str = "cpu",
) -> tuple[pl.DataFrame, dict]:
    """Validation loss against a fixed-lr probe's test top-1 for (up to ``max_checkpoints`` of)
    the kept ``steps`` of a run of model ``cfg``; ``load_step(step)`` gives a step's weights.

    Returns the table (step, val_loss, top1) and a summary with Spearman's rho; a step the
    history has no validation loss for is skipped with a warning.
    """
    start = time.perf_counter()
    shots = None if study.shots is None else int(study.shots)
    layers = resolve_layers(features.layers, cfg)
    picked = pick_steps(list(steps), study.max_checkpoints)
    protocol = probes.protocol(device)
    splits, draws = _probe_images(eval_sets, cfg.img_size, features.batch_size, shots,
                                  protocol.shot_seeds)
    num_classes = max(s.num_classes for s in eval_sets.values())
    rows = []
    for step in tqdm(picked, desc="loss vs accuracy", unit="ckpt"):
        val_loss = val_loss_at(history, step)
        if val_loss is None:
            logger.warning("loss_vs_accuracy: no val_loss at step %d in training_history; skipped",
                           step)
            continue
        frozen = trunk_from_state_dict(cfg, load_step(step), f"step {step}")
        with cpu_threads(features.cpu_threads):
            feats = {
                name: extract_features(frozen, batches, layers, device=device,
                                       total=sum(len(b[1]) for b in batches),
                                       desc=f"step {step} {name}")
                for name, batches in splits.items()
            }
        with cpu_threads(probes.cpu_threads):
            top1 = fixed_lr_probe_top1(
                FeatureSplit(feats["train"]["tokens"], feats["train"]["labels"]),
                FeatureSplit(feats["test"]["tokens"], feats["test"]["labels"]),
                num_classes, cfg.num_heads, protocol, float(study.lr), kind=study.kind,
                shots=shots, draws=draws,
            )
        rows.append({"step": int(step), "val_loss": val_loss, "top1": top1})
    table = pl.DataFrame(rows, schema=TABLE_SCHEMA)
    rho, p_value = spearman(table)
    probe = (
        f"{study.kind} probe, fixed lr {float(study.lr):g}, "
        + (f"{shots}-shot (mean over seeds {list(protocol.shot_seeds)})" if shots else "all labels")
        + ", test top-1"
    )
    summary = {"spearman": rho, "p_value": p_value, "n": table.height, "probe": probe,
               "layers": layers, "steps": table["step"].to_list()}
    logger.info(
        "loss_vs_accuracy: %d checkpoints, Spearman(val_loss, top1) = %s (p=%s) with %s, in %.1fs",
        table.height, f"{rho:.3f}" if rho is not None else "n/a",
        f"{p_value:.3g}" if p_value is not None else "n/a", probe, time.perf_counter() - start,
    )
    return table, summary


# --- the scaling study: power laws of validation loss, and loss against accuracy over a grid ---

def power_law_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
    """Least squares of ``log y = log coefficient - exponent * log x``: ``y ~ x ** -exponent``,
    with R^2 in log-log space. None values with fewer than 2 distinct positive ``x``."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None and a > 0 and b > 0]
    if len({a for a, _ in pairs}) < 2:
        return {"exponent": None, "coefficient": None, "r2": None, "n": len(pairs)}
    log_x, log_y = np.log([a for a, _ in pairs]), np.log([b for _, b in pairs])
    slope, intercept = np.polyfit(log_x, log_y, 1)
    residual = float(((log_y - (intercept + slope * log_x)) ** 2).sum())
    total = float(((log_y - log_y.mean()) ** 2).sum())
    return {"exponent": float(-slope), "coefficient": float(math.exp(intercept)),
            "r2": 1.0 - residual / total if total > 0 else None, "n": len(pairs)}


def joint_power_law_fit(params: Sequence[float], data: Sequence[float],
                        loss: Sequence[float]) -> dict[str, float | int | None]:
    """``loss ~ coefficient * params ** -params_exponent * data ** -data_exponent`` (least
    squares in log space, R^2 there); None values when either axis has one value."""
    rows = np.log(np.array([[p, d, v] for p, d, v in zip(params, data, loss, strict=True)
                            if v is not None and v > 0], dtype=float).reshape(-1, 3))
    if len(rows) < 4 or min(len(np.unique(rows[:, 0])), len(np.unique(rows[:, 1]))) < 2:
        return {"params_exponent": None, "data_exponent": None, "coefficient": None, "r2": None,
                "n": len(rows)}
    design = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1]])
    (intercept, a, b), *_ = np.linalg.lstsq(design, rows[:, 2], rcond=None)
    residual = float(((rows[:, 2] - design @ np.array([intercept, a, b])) ** 2).sum())
    total = float(((rows[:, 2] - rows[:, 2].mean()) ** 2).sum())
    return {"params_exponent": float(-a), "data_exponent": float(-b),
            "coefficient": float(math.exp(intercept)),
            "r2": 1.0 - residual / total if total > 0 else None, "n": len(rows)}


def scaling_summary(results: pl.DataFrame, budget: str) -> dict[str, Any]:
    """Power laws of the final validation loss against trunk parameters (one per data size) and
    against training images (one per capacity), a joint fit, Spearman's rho of loss with each
    probe's top-1 over every run, and the paper's findings checked at the largest data size.

    Fits use the mean over seeds of each (capacity, data size); Spearman uses every run.
    """
    probes = [low_shot_column(results), "attentive_top1", "linear_top1"]
    means = results.group_by("capacity", "data").agg(
        pl.col("trunk_params", "train_images").first(), pl.col("final_val_loss").mean(),
        *[pl.col(p).mean() for p in probes if p in results.columns],
    )
    capacity_params = by_size(results, "capacity", "trunk_params")
    data_images = by_size(results, "data", "train_images")
    capacities, sizes = list(capacity_params), list(data_images)

    def fit(name: str, value: str, x: str) -> dict[str, Any]:
        rows = means.filter(pl.col(name) == value).sort(x)
        return power_law_fit(rows[x].to_list(), rows["final_val_loss"].to_list())

    spearman_by_probe = {}
    for probe in (p for p in probes if p in results.columns):
        pairs = results.select(val_loss="final_val_loss", top1=probe).drop_nulls()
        rho, p_value = spearman(pairs)
        spearman_by_probe[probe] = {"rho": rho, "p_value": p_value, "n": pairs.height}
    largest = means.filter(pl.col("data") == sizes[-1]).sort("trunk_params")
    names, losses = largest["capacity"].to_list(), largest["final_val_loss"].to_list()
    exceptions = [f"{a} -> {b}: {la:.4f} -> {lb:.4f}" for a, b, la, lb in
                  zip(names, names[1:], losses, losses[1:], strict=False) if lb >= la]
    headline = probes[0]
    top1 = largest[headline].to_list() if headline in largest.columns else []
    rho = spearman_by_probe.get(headline, {}).get("rho")
    summary = {
        "budget": budget,
        "steps": sorted(set(results["steps"].to_list())),
        "grid": {"capacities": capacity_params, "data_sizes": data_images,
                 "seeds": sorted(set(results["seed"].to_list())), "runs": results.height},
        "loss_vs_params": {d: fit("data", d, "trunk_params") for d in sizes},
        "loss_vs_data": {c: fit("capacity", c, "train_images") for c in capacities},
        "loss_joint": joint_power_law_fit(means["trunk_params"].to_list(),
                                          means["train_images"].to_list(),
                                          means["final_val_loss"].to_list()),
        "spearman": spearman_by_probe,
        "headline_probe": headline,
        "findings": {
            "largest_data": sizes[-1],
            "val_loss_by_capacity": dict(zip(names, losses, strict=True)),
            "loss_falls_with_capacity": bool(len(losses) > 1 and not exceptions),
            "exceptions": exceptions,
            f"{headline}_smallest": top1[0] if top1 else None,
            f"{headline}_largest": top1[-1] if top1 else None,
            "largest_beats_smallest": bool(len(top1) > 1 and top1[-1] > top1[0]),
            "spearman_negative": rho is not None and rho < 0,
        },
    }
    logger.info("scaling: %d runs; loss ~ params^-%s at %s; Spearman(loss, %s) = %s",
                results.height, _fmt(summary["loss_vs_params"][sizes[-1]]["exponent"]),
                sizes[-1], headline, _fmt(rho))
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
