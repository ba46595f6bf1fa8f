"""Nodes of the ``evaluation`` pipeline: thin glue over ``aim_kedro.aim`` (features, probes,
studies). The first node checks ``params:evaluation`` once and hands each node the typed blocks
it uses (``eval_features_config``, ``eval_probes_config``, ..., and the resolved ``eval_device``).
"""

from __future__ import annotations

import logging
from typing import Any

import polars as pl
import torch
from matplotlib.figure import Figure

from aim_kedro.aim import studies
from aim_kedro.aim.configs import (
    AimPaperConfig,
    DatasetConfig,
    EvaluationConfig,
    FeaturesConfig,
    LossVsAccuracyConfig,
    MlAimTrunkConfig,
    ProbesConfig,
    RandomInitConfig,
)
from aim_kedro.aim.evalsets import LabelledSet, labelled_pair
from aim_kedro.aim.features import (
    FrozenTrunk,
    extract_split_features,
    random_trunk,
    resolve_layers,
    trunk_from_state_dict,
)
from aim_kedro.aim.interop import from_ml_aim
from aim_kedro.aim.presets import config_from_checkpoint
from aim_kedro.aim.probe_views import TrunkViews
from aim_kedro.aim.probes import FeatureSplit, run_protocol
from aim_kedro.common.training import cpu_threads
from aim_kedro.io.shards import ShardSet

logger = logging.getLogger(__name__)

PROBE_BLOCKS = ("device", "recipe", "dataset", "features", "random_init", "probes", "aim_paper")
STUDY_BLOCKS = (*PROBE_BLOCKS, "loss_vs_accuracy")
ML_AIM_BLOCKS = (*PROBE_BLOCKS, "trunk")


def _blocks(cfg: EvaluationConfig, names: tuple[str, ...]) -> dict[str, Any]:
    logger.info("evaluation: layers %s, probes %s (%s recipe) on %s", cfg.features.layers,
                list(cfg.probes.kinds), cfg.recipe, cfg.device)
    return {name: getattr(cfg, name) for name in names}


def validate_evaluation_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params:evaluation`` before any heavy work; return its typed blocks by name
    (``device`` resolved to ``cuda`` or ``cpu``).

    Raises ``ValueError`` naming the parameter and the fix (an unknown key or kind, a bad layer
    spec, empty lr grids, a key that is now a catalog entry).
    """
    return _blocks(EvaluationConfig.from_params(params), STUDY_BLOCKS)


def validate_ml_aim_evaluation_params(params: dict[str, Any]) -> dict[str, Any]:
    """:func:`validate_evaluation_params` for the published checkpoint: ``trunk.config`` given."""
    cfg = EvaluationConfig.from_params(params)
    trunk = cfg.trunk.ml_aim()
    return {**_blocks(cfg, PROBE_BLOCKS), "trunk": trunk}


def load_eval_sets(
    probe_train: ShardSet | LabelledSet, probe_test: ShardSet | LabelledSet, dataset: DatasetConfig
) -> dict[str, LabelledSet]:
    """The labelled train/test sets with one class index (probe shards or ImageFolder trees)."""
    train, test = labelled_pair(probe_train, probe_test, dataset.num_classes)
    logger.info(
        "load_eval_sets: %s train images, %s test images, %d classes (%s, %s)",
        train.size if train.size is not None else "?",
        test.size if test.size is not None else "?",
        train.num_classes, train.source, test.source,
    )
    return {"train": train, "test": test}


def _log_trunk(frozen: FrozenTrunk) -> FrozenTrunk:
    params = sum(p.numel() for p in frozen.trunk.parameters())
    cfg = frozen.cfg
    logger.info("load_trunk: %s, %.2fM parameters, width %d, depth %d, %d heads, %d px / patch %d",
                frozen.source, params / 1e6, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size,
                cfg.patch_size)
    return frozen


def load_trunk(aim_checkpoint: dict[str, Any]) -> FrozenTrunk:
    """The frozen trunk of the catalog's ``aim_checkpoint``."""
    cfg = config_from_checkpoint(aim_checkpoint["config"])
    preset = aim_checkpoint["config"].get("preset", "custom")
    step = (aim_checkpoint.get("metadata") or {}).get("step")
    return _log_trunk(trunk_from_state_dict(cfg, aim_checkpoint["state_dict"],
                                            f"aim_checkpoint({preset}, step={step})"))


def load_ml_aim_trunk(
    ml_aim_checkpoint: dict[str, torch.Tensor], trunk: MlAimTrunkConfig
) -> FrozenTrunk:
    """The frozen trunk of a published AIM v1 checkpoint (``ml_aim_checkpoint``)."""
    model = from_ml_aim(ml_aim_checkpoint, **trunk.kwargs())
    return _log_trunk(FrozenTrunk(model.trunk, model.trunk.cfg,
                                  f"ml_aim_checkpoint({trunk.num_blocks} blocks)"))


def _extract(frozen: FrozenTrunk, eval_sets: dict[str, LabelledSet], features: FeaturesConfig,
             device: str) -> dict[str, Any]:
    with cpu_threads(features.cpu_threads):
        return extract_split_features(
            frozen, eval_sets, resolve_layers(features.layers, frozen.cfg),
            batch_size=int(features.batch_size), device=device,
            store_dtype=features.store_dtype, crop_pct=float(features.crop_pct),
        )


def extract_probe_features(
    eval_trunk: FrozenTrunk, eval_sets: dict[str, LabelledSet], features: FeaturesConfig,
    device: str,
) -> dict[str, Any]:
    """Token-level features of the train and test sets from the frozen pre-trained trunk."""
    return _extract(eval_trunk, eval_sets, features, device)


def extract_random_init_features(
    eval_trunk: FrozenTrunk, eval_sets: dict[str, LabelledSet], features: FeaturesConfig,
    random_init: RandomInitConfig, device: str,
) -> dict[str, Any]:
    """The same features from a randomly initialised trunk of the same config (fixed seed)."""
    return _extract(random_trunk(eval_trunk.cfg, int(random_init.seed)), eval_sets, features,
                    device)


def _train_views(
    recipe: str, aim_paper: AimPaperConfig, frozen: FrozenTrunk, eval_sets: dict[str, LabelledSet],
    features: dict[str, Any], device: str,
) -> TrunkViews | None:
    """Under ``recipe: aim_paper``, the training images' augmented views through ``frozen``
    (rows aligned with the cached training features); None under the cached recipe."""
    if recipe != "aim_paper":
        return None
    views = TrunkViews.from_labelled(eval_sets["train"], frozen, features["layers"],
                                     aim_paper.augmentation(), device)
    if not torch.equal(views.row_labels(), features["train"]["labels"].long()):
        raise ValueError(f"{frozen.source}: the training images do not match the cached training "
                         "features (re-run extract_probe_features on the same probe_train)")
    return views


def train_probes(
    probe_features: dict[str, Any], random_init_features: dict[str, Any], probes: ProbesConfig,
    device: str, recipe: str, aim_paper: AimPaperConfig, eval_trunk: FrozenTrunk,
    eval_sets: dict[str, LabelledSet], random_init: RandomInitConfig,
) -> dict[str, Any]:
    """Attentive and linear probes (all labels and low-shot) on both trunks: ``probe_metrics``.

    ``recipe: cached`` fits them on the cached features; ``aim_paper`` on augmented views of the
    training images through each frozen trunk (the random-init one rebuilt from its seed), with
    the cached features scoring the held-out and test images. Both report the same metrics.
    """
    paper = recipe == "aim_paper"
    protocol = aim_paper.protocol(probes, device) if paper else probes.protocol(device)
    trunks = {"pretrained": eval_trunk,
              "random_init": random_trunk(eval_trunk.cfg, int(random_init.seed)) if paper else None}
    metrics: dict[str, Any] = {}
    for name, features in (("pretrained", probe_features), ("random_init", random_init_features)):
        train = FeatureSplit(features["train"]["tokens"], features["train"]["labels"])
        test = FeatureSplit(features["test"]["tokens"], features["test"]["labels"])
        with cpu_threads(probes.cpu_threads):
            views = _train_views(recipe, aim_paper, trunks[name], eval_sets, features, device)
            metrics[name] = run_protocol(train, test, int(features["num_classes"]),
                                         int(features["num_heads"]), protocol, features["layers"],
                                         desc=f"{name} probes", train_views=views)
        metrics[name].update(trunk=features["trunk"], recipe=recipe)
    shot_key = f"attentive_{protocol.shots}shot"
    if "attentive" in protocol.kinds:
        pre, rand = metrics["pretrained"], metrics["random_init"]
        gain = pre[shot_key]["top1"] - rand[shot_key]["top1"]
        metrics["pretraining_gain"] = {
            shot_key: gain, "attentive": pre["attentive"]["top1"] - rand["attentive"]["top1"]
        }
        logger.info(
            "train_probes: attentive %d-shot top1 %.3f vs random %.3f (%+.1f pts); all labels %.3f vs %.3f",
            protocol.shots, pre[shot_key]["top1"], rand[shot_key]["top1"], 100 * gain,
            pre["attentive"]["top1"], rand["attentive"]["top1"],
        )
    return metrics


def plot_probe_results(probe_metrics: dict[str, Any]) -> Figure:
    """Grouped bars of test top-1 per probe, pre-trained vs random-init trunk (std over draws)."""
    trunks = [t for t in ("pretrained", "random_init") if t in probe_metrics]
    probes = [k for k, v in probe_metrics[trunks[0]].items() if isinstance(v, dict) and "top1" in v]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(trunks)
    for i, trunk in enumerate(trunks):
        top1 = [100 * probe_metrics[trunk][p]["top1"] for p in probes]
        std = [100 * probe_metrics[trunk][p].get("std", 0.0) for p in probes]
        xs = [j + (i - (len(trunks) - 1) / 2) * width for j in range(len(probes))]
        bars = ax.bar(xs, top1, width, yerr=std, capsize=3, label=trunk.replace("_", " "))
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(probes)), [p.replace("_", "\n") for p in probes])
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Frozen-trunk probes: pre-trained vs random init")
    ax.legend(loc="upper right")
    logger.info("plot_probe_results: %d probes x %d trunks", len(probes), len(trunks))
    return fig


def loss_vs_accuracy(
    aim_intermediate_checkpoints: dict[str, Any],
    training_history: pl.DataFrame,
    eval_sets: dict[str, LabelledSet],
    study: LossVsAccuracyConfig,
    features: FeaturesConfig,
    probes: ProbesConfig,
    device: str,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Validation loss against a fixed-lr probe's top-1 for the intermediate checkpoints
    (``aim.studies.loss_vs_accuracy``); the summary holds Spearman's rho."""
    series = aim_intermediate_checkpoints
    return studies.loss_vs_accuracy(
        config_from_checkpoint(series["config"]), series["steps"], series["load"],
        training_history, eval_sets, study, features, probes, device,
    )


def plot_loss_vs_accuracy(
    loss_vs_accuracy: pl.DataFrame, loss_vs_accuracy_summary: dict[str, Any]
) -> Figure:
    """Left: val loss and probe top-1 over steps; right: top-1 against val loss with Spearman's rho."""
    table = loss_vs_accuracy.sort("step")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_steps, ax_scatter = fig.subplots(1, 2)
    steps = table["step"].to_list()
    top1 = [100 * v for v in table["top1"].to_list()]
    ax_steps.plot(steps, table["val_loss"].to_list(), "o-", color="tab:red", label="val loss")
    ax_steps.set_xlabel("pre-training step")
    ax_steps.set_ylabel("validation loss", color="tab:red")
    ax_acc = ax_steps.twinx()
    ax_acc.plot(steps, top1, "s-", color="tab:blue")
    ax_acc.set_ylabel("probe top-1 (%)", color="tab:blue")
    ax_steps.set_title("over pre-training")
    ax_scatter.scatter(table["val_loss"].to_list(), top1, c=steps, cmap="viridis")
    for step, loss, acc in zip(steps, table["val_loss"].to_list(), top1, strict=True):
        ax_scatter.annotate(str(step), (loss, acc), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    rho = loss_vs_accuracy_summary.get("spearman")
    rho_text = "n/a" if rho is None else f"{rho:.2f}"
    ax_scatter.set_title(f"Spearman rho = {rho_text} (n = {loss_vs_accuracy_summary.get('n')})")
    ax_scatter.set_xlabel("validation loss")
    ax_scatter.set_ylabel("probe top-1 (%)")
    fig.suptitle(loss_vs_accuracy_summary.get("probe", ""), fontsize=9)
    logger.info("plot_loss_vs_accuracy: %d points, rho %s", table.height, rho_text)
    return fig
