"""Studies over a pre-training run: validation loss against probe accuracy of its checkpoints.

The paper's claim (its Fig. 1, right) is that the pre-training objective tracks downstream
quality. Here, for each kept step: the validation loss from the training history, and the test
top-1 of a cheap fixed-lr probe on that step's frozen features; the summary is Spearman's rho.
The labelled images are decoded once and only the images the probes use go through each trunk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

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
