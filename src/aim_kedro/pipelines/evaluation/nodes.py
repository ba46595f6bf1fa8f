"""Nodes of the ``evaluation`` pipeline: thin glue over ``aim_kedro.aim`` (features, probes)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import polars as pl
import torch
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from aim_kedro.aim.data import eval_transform
from aim_kedro.aim.evalsets import LabelledSet, open_labelled_pair
from aim_kedro.aim.features import (
    FrozenTrunk,
    extract_features,
    extract_split_features,
    image_batches,
    random_trunk,
    resolve_layers,
    trunk_from_state_dict,
)
from aim_kedro.aim.interop import load_aim_v1_checkpoint
from aim_kedro.aim.presets import AIMConfig
from aim_kedro.aim.probes import (
    PROBE_KINDS,
    FeatureSplit,
    ProbeProtocol,
    ProbeTraining,
    few_shot_indices,
    fixed_lr_probe_top1,
    run_protocol,
)
from aim_kedro.common.training import cpu_threads

logger = logging.getLogger(__name__)

TRUNK_SOURCES = ("catalog", "ml_aim")
DATASET_KINDS = ("catalog", "image_folder", "shards")
ML_AIM_KEYS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "num_blocks",
    "num_heads",
    "probe_layers",
    "num_classes",
)
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _fail(param: str, problem: str, fix: str) -> None:
    raise ValueError(f"params:evaluation.{param} {problem}; {fix}")


def _section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name) or {}
    if not isinstance(value, Mapping):
        _fail(name, f"must be a mapping, got {value!r}", "see conf/base/parameters_evaluation.yml")
    return dict(value)


def _check_path(param: str, path: Any) -> None:
    if not path:
        _fail(param, "is not set", "give the path of an existing file or folder")
    if "://" not in str(path) and not os.path.exists(str(path)):
        _fail(param, f"points to {path!r}, which does not exist", "fix the path")


def _validate_probes(probes: dict[str, Any]) -> None:
    kinds = list(probes.get("kinds", PROBE_KINDS))
    unknown = [k for k in kinds if k not in PROBE_KINDS]
    if not kinds or unknown:
        _fail("probes.kinds", f"holds {kinds}", f"use a non-empty subset of {list(PROBE_KINDS)}")
    lrs = probes.get("lrs") or {}
    for kind in kinds:
        values = lrs.get(kind)
        if not values or any(float(v) <= 0 for v in values):
            _fail(
                f"probes.lrs.{kind}",
                f"is {values!r}",
                "give a non-empty list of positive learning rates",
            )
    fraction = float(probes.get("val_fraction", 0.2))
    if not 0.0 < fraction < 1.0:
        _fail("probes.val_fraction", f"is {fraction}", "use a fraction in (0, 1), e.g. 0.2")
    low_shot = probes.get("low_shot") or {}
    if int(low_shot.get("shots", 10)) < 1 or not low_shot.get("seeds", [0]):
        _fail("probes.low_shot", f"is {low_shot}", "give shots >= 1 and a non-empty list of seeds")
    threads = probes.get("cpu_threads", 1)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        _fail("probes.cpu_threads", f"is {threads!r}", "use a positive integer or null")
    for key in ("epochs", "batch_size"):
        if int(probes.get(key, 1)) < 1:
            _fail(f"probes.{key}", f"is {probes.get(key)}", "use a positive integer")


def validate_evaluation_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params:evaluation`` before any heavy work; return it with defaults filled in.

    Raises ``ValueError`` naming the parameter and the fix (unknown source or kind, a path that
    does not exist, a bad layer spec, empty lr grids).
    """
    settings = copy.deepcopy(dict(params))
    trunk = _section(settings, "trunk")
    source = trunk.setdefault("source", "catalog")
    if source not in TRUNK_SOURCES:
        _fail("trunk.source", f"is {source!r}", f"use one of {list(TRUNK_SOURCES)}")
    if source == "ml_aim":
        _check_path("trunk.path", trunk.get("path"))
        config = trunk.get("config") or {}
        missing = [k for k in ML_AIM_KEYS if k not in config]
        if missing:
            _fail("trunk.config", f"lacks {missing}", f"an AIM v1 config needs {list(ML_AIM_KEYS)}")
    dataset = _section(settings, "dataset")
    kind = dataset.setdefault("kind", "catalog")
    if kind not in DATASET_KINDS:
        _fail("dataset.kind", f"is {kind!r}", f"use one of {list(DATASET_KINDS)}")
    if kind != "catalog":
        _check_path("dataset.train_path", dataset.get("train_path"))
        _check_path("dataset.test_path", dataset.get("test_path"))
    features = _section(settings, "features")
    features.setdefault("layers", "last6")
    layers = features["layers"]
    if not (isinstance(layers, str | int) or isinstance(layers, list) and layers):
        _fail(
            "features.layers",
            f"is {layers!r}",
            "use 'last6', 'best', 'all', an int or a list of indices",
        )
    if isinstance(layers, str):
        try:
            resolve_layers(layers, AIMConfig(embed_dim=64, depth=24, num_heads=4))
        except ValueError as exc:
            _fail("features.layers", f"is {layers!r} ({exc})", "see parameters_evaluation.yml")
    threads = features.get("cpu_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        _fail("features.cpu_threads", f"is {threads!r}", "use a positive integer or null")
    dtype = features.setdefault("dtype", "float16")
    if dtype not in STORE_DTYPES:
        _fail("features.dtype", f"is {dtype!r}", f"use one of {list(STORE_DTYPES)}")
    probes = _section(settings, "probes")
    _validate_probes(probes)
    lva = _section(settings, "loss_vs_accuracy")
    if lva.get("kind", "attentive") not in PROBE_KINDS or float(lva.get("lr", 1e-3)) <= 0:
        _fail("loss_vs_accuracy", f"is {lva}", f"use kind in {list(PROBE_KINDS)} and a positive lr")
    device = settings.setdefault("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        _fail("device", f"is {device!r} but no CUDA device is available", "use 'auto' or 'cpu'")
    settings.update(
        trunk=trunk, dataset=dataset, features=features, probes=probes, loss_vs_accuracy=lva
    )
    settings["device"] = device
    logger.info(
        "evaluation: trunk from %s, data from %s, layers %s, probes %s on %s",
        source,
        kind,
        layers,
        probes.get("kinds", list(PROBE_KINDS)),
        device,
    )
    return settings


def load_eval_sets(
    probe_train: Any, probe_test: Any, settings: dict[str, Any]
) -> dict[str, LabelledSet]:
    """The labelled train/test sets: the catalog's probe shards, or the folders the params name."""
    dataset = settings["dataset"]
    num_classes = dataset.get("num_classes")
    if dataset["kind"] == "catalog":
        train, test = open_labelled_pair("shards", probe_train, probe_test, num_classes)
    else:
        train, test = open_labelled_pair(
            dataset["kind"], dataset["train_path"], dataset["test_path"], num_classes
        )
    logger.info(
        "load_eval_sets: %s train images, %s test images, %d classes (%s)",
        train.size if train.size is not None else "?",
        test.size if test.size is not None else "?",
        train.num_classes,
        dataset["kind"],
    )
    return {"train": train, "test": test}


def config_from_checkpoint(config: Mapping[str, Any]) -> AIMConfig:
    """An ``AIMConfig`` from a checkpoint's ``config`` dict (extra keys such as ``preset`` are ignored)."""
    known = {f.name for f in dataclasses.fields(AIMConfig)}
    return AIMConfig.from_dict({k: v for k, v in config.items() if k in known})


def load_trunk(
    settings: dict[str, Any], aim_checkpoint: dict[str, Any] | None = None
) -> FrozenTrunk:
    """The frozen trunk to probe: the catalog's ``aim_checkpoint`` or a published AIM v1 file."""
    trunk = settings["trunk"]
    if trunk["source"] == "ml_aim":
        model = load_aim_v1_checkpoint(
            trunk["path"], **{k: trunk["config"][k] for k in ML_AIM_KEYS}
        )
        frozen = FrozenTrunk(model.trunk, model.trunk.cfg, f"ml_aim:{trunk['path']}")
    else:
        if aim_checkpoint is None:
            raise ValueError(
                "params:evaluation.trunk.source is 'catalog' but this pipeline was built without the "
                "aim_checkpoint input; use the default evaluation pipeline or trunk.source: ml_aim"
            )
        cfg = config_from_checkpoint(aim_checkpoint["config"])
        preset = aim_checkpoint["config"].get("preset", "custom")
        step = (aim_checkpoint.get("metadata") or {}).get("step")
        frozen = trunk_from_state_dict(
            cfg, aim_checkpoint["state_dict"], f"aim_checkpoint({preset}, step={step})"
        )
    params = sum(p.numel() for p in frozen.trunk.parameters())
    logger.info(
        "load_trunk: %s, %.2fM parameters, width %d, depth %d, %d heads, %d px / patch %d",
        frozen.source,
        params / 1e6,
        frozen.cfg.embed_dim,
        frozen.cfg.depth,
        frozen.cfg.num_heads,
        frozen.cfg.img_size,
        frozen.cfg.patch_size,
    )
    return frozen


def _extract(
    frozen: FrozenTrunk, eval_sets: dict[str, LabelledSet], settings: dict[str, Any]
) -> dict[str, Any]:
    features = settings["features"]
    layers = resolve_layers(features["layers"], frozen.cfg)
    with cpu_threads(features.get("cpu_threads")):
        return extract_split_features(
            frozen,
            eval_sets,
            layers,
            batch_size=int(features.get("batch_size", 64)),
            device=settings["device"],
            store_dtype=STORE_DTYPES[features["dtype"]],
            crop_pct=float(features.get("crop_pct", 1.0)),
        )


def extract_probe_features(
    eval_trunk: FrozenTrunk, eval_sets: dict[str, LabelledSet], settings: dict[str, Any]
) -> dict[str, Any]:
    """Token-level features of the train and test sets from the frozen pre-trained trunk."""
    return _extract(eval_trunk, eval_sets, settings)


def extract_random_init_features(
    eval_trunk: FrozenTrunk, eval_sets: dict[str, LabelledSet], settings: dict[str, Any]
) -> dict[str, Any]:
    """The same features from a randomly initialised trunk of the same config (fixed seed)."""
    seed = int((settings.get("random_init") or {}).get("seed", 0))
    return _extract(random_trunk(eval_trunk.cfg, seed), eval_sets, settings)


def probe_protocol(settings: dict[str, Any]) -> ProbeProtocol:
    """The ``ProbeProtocol`` that ``params:evaluation.probes`` describes."""
    probes = settings["probes"]
    low_shot = probes.get("low_shot") or {}
    training = ProbeTraining(
        epochs=int(probes.get("epochs", 30)),
        min_steps=int(probes.get("min_steps", 100)),
        batch_size=int(probes.get("batch_size", 64)),
        warmup_fraction=float(probes.get("warmup_fraction", 0.1)),
        device=settings["device"],
    )
    defaults = ProbeProtocol()
    return ProbeProtocol(
        kinds=tuple(probes.get("kinds", PROBE_KINDS)),
        lrs={k: [float(v) for v in vs] for k, vs in (probes.get("lrs") or defaults.lrs).items()},
        weight_decay={
            k: float(v) for k, v in (probes.get("weight_decay") or defaults.weight_decay).items()
        },
        val_fraction=float(probes.get("val_fraction", 0.2)),
        shots=int(low_shot.get("shots", 10)),
        shot_seeds=tuple(int(s) for s in low_shot.get("seeds", (0, 1, 2))),
        seed=int(probes.get("seed", 0)),
        training=training,
    )


def _splits(features: dict[str, Any]) -> tuple[FeatureSplit, FeatureSplit]:
    return (
        FeatureSplit(features["train"]["tokens"], features["train"]["labels"]),
        FeatureSplit(features["test"]["tokens"], features["test"]["labels"]),
    )


def train_probes(
    probe_features: dict[str, Any], random_init_features: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """Attentive and linear probes (all labels and low-shot) on both trunks: ``probe_metrics``."""
    protocol = probe_protocol(settings)
    metrics: dict[str, Any] = {}
    for name, features in (("pretrained", probe_features), ("random_init", random_init_features)):
        train, test = _splits(features)
        with cpu_threads(settings["probes"].get("cpu_threads", 1)):
            metrics[name] = run_protocol(
                train,
                test,
                int(features["num_classes"]),
                int(features["num_heads"]),
                protocol,
                features["layers"],
                desc=f"{name} probes",
            )
        metrics[name]["trunk"] = features["trunk"]
    shot_key = f"attentive_{protocol.shots}shot"
    if "attentive" in protocol.kinds:
        gain = metrics["pretrained"][shot_key]["top1"] - metrics["random_init"][shot_key]["top1"]
        gain_all = (
            metrics["pretrained"]["attentive"]["top1"] - metrics["random_init"]["attentive"]["top1"]
        )
        metrics["pretraining_gain"] = {shot_key: gain, "attentive": gain_all}
        logger.info(
            "train_probes: attentive %d-shot top1 %.3f vs random %.3f (%+.1f pts); all labels %.3f vs %.3f",
            protocol.shots,
            metrics["pretrained"][shot_key]["top1"],
            metrics["random_init"][shot_key]["top1"],
            100 * gain,
            metrics["pretrained"]["attentive"]["top1"],
            metrics["random_init"]["attentive"]["top1"],
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


def _pick_steps(steps: list[int], max_checkpoints: int | None) -> list[int]:
    steps = sorted(steps)
    if not max_checkpoints or len(steps) <= max_checkpoints:
        return steps
    if max_checkpoints == 1:
        return [steps[-1]]
    picks = {round(i * (len(steps) - 1) / (max_checkpoints - 1)) for i in range(max_checkpoints)}
    return [steps[i] for i in sorted(picks)]


def _decoded(
    labelled: LabelledSet, img_size: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(image_batches(labelled, eval_transform(img_size), batch_size))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _batched(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def _val_loss_at(history: pl.DataFrame, step: int) -> float | None:
    rows = history.filter((pl.col("step") == step) & pl.col("val_loss").is_not_null())
    return float(rows["val_loss"][-1]) if rows.height else None


def loss_vs_accuracy(
    aim_intermediate_checkpoints: dict[str, Any],
    training_history: pl.DataFrame,
    eval_sets: dict[str, LabelledSet],
    settings: dict[str, Any],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Validation loss against a fixed-lr attentive probe's top-1 for intermediate checkpoints.

    The probe (``params:evaluation.loss_vs_accuracy``: kind, lr, shots; ``shots: null`` for all
    labels) trains on cached features of each checkpoint; the summary holds Spearman's rho.
    """
    start = time.perf_counter()
    lva = settings["loss_vs_accuracy"]
    kind, lr = lva.get("kind", "attentive"), float(lva.get("lr", 1e-3))
    shots = lva.get("shots", 10)
    shots = None if shots is None else int(shots)
    cfg = config_from_checkpoint(aim_intermediate_checkpoints["config"])
    layers = resolve_layers(settings["features"]["layers"], cfg)
    steps = _pick_steps(list(aim_intermediate_checkpoints["steps"]), lva.get("max_checkpoints"))
    protocol = probe_protocol(settings)
    batch_size = int(settings["features"].get("batch_size", 64))
    train_images, train_labels = _decoded(eval_sets["train"], cfg.img_size, batch_size)
    test_images, test_labels = _decoded(eval_sets["test"], cfg.img_size, batch_size)
    draws = None
    if shots is not None:
        # Only the images of the low-shot draws need features: decode all, run the trunk on few.
        full_draws = [few_shot_indices(train_labels, shots, seed) for seed in protocol.shot_seeds]
        used = torch.unique(torch.cat(full_draws))
        draws = [torch.searchsorted(used, d) for d in full_draws]
        train_images, train_labels = train_images[used], train_labels[used]
    splits = {
        "train": _batched(train_images, train_labels, batch_size),
        "test": _batched(test_images, test_labels, batch_size),
    }
    num_classes = max(s.num_classes for s in eval_sets.values())
    rows = []
    for step in tqdm(steps, desc="loss vs accuracy", unit="ckpt"):
        val_loss = _val_loss_at(training_history, step)
        if val_loss is None:
            logger.warning(
                "loss_vs_accuracy: no val_loss at step %d in training_history; skipped", step
            )
            continue
        frozen = trunk_from_state_dict(
            cfg, aim_intermediate_checkpoints["load"](step), f"step {step}"
        )
        with cpu_threads(settings["features"].get("cpu_threads")):
            feats = {
                name: extract_features(
                    frozen,
                    batches,
                    layers,
                    device=settings["device"],
                    total=sum(len(b[1]) for b in batches),
                    desc=f"step {step} {name}",
                )
                for name, batches in splits.items()
            }
        with cpu_threads(settings["probes"].get("cpu_threads", 1)):
            top1 = fixed_lr_probe_top1(
                FeatureSplit(feats["train"]["tokens"], feats["train"]["labels"]),
                FeatureSplit(feats["test"]["tokens"], feats["test"]["labels"]),
                num_classes,
                cfg.num_heads,
                protocol,
                lr,
                kind=kind,
                shots=shots,
                draws=draws,
            )
        rows.append({"step": int(step), "val_loss": val_loss, "top1": top1})
    table = pl.DataFrame(
        rows, schema={"step": pl.Int64, "val_loss": pl.Float64, "top1": pl.Float64}
    )
    rho, p_value = (float("nan"), float("nan"))
    if table.height >= 3:
        result = spearmanr(table["val_loss"].to_numpy(), table["top1"].to_numpy())
        rho, p_value = float(result.statistic), float(result.pvalue)
    else:
        logger.warning(
            "loss_vs_accuracy: %d checkpoint(s) with a val_loss, Spearman needs >= 3", table.height
        )
    probe = (
        f"{kind} probe, fixed lr {lr:g}, "
        + (f"{shots}-shot (mean over seeds {list(protocol.shot_seeds)})" if shots else "all labels")
        + ", test top-1"
    )
    summary = {
        "spearman": None if math.isnan(rho) else rho,
        "p_value": None if math.isnan(p_value) else p_value,
        "n": table.height,
        "probe": probe,
        "layers": layers,
        "steps": table["step"].to_list(),
    }
    logger.info(
        "loss_vs_accuracy: %d checkpoints, Spearman(val_loss, top1) = %s (p=%s) with %s, in %.1fs",
        table.height,
        f"{rho:.3f}",
        f"{p_value:.3g}",
        probe,
        time.perf_counter() - start,
    )
    return table, summary


def plot_loss_vs_accuracy(
    loss_vs_accuracy: pl.DataFrame, loss_vs_accuracy_summary: dict[str, Any]
) -> Figure:
    """Left: val loss and probe top-1 over steps; right: top-1 against val loss with Spearman's rho."""
    table = loss_vs_accuracy.sort("step")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_steps, ax_scatter = fig.subplots(1, 2)
    steps = table["step"].to_list()
    ax_steps.plot(steps, table["val_loss"].to_list(), "o-", color="tab:red", label="val loss")
    ax_steps.set_xlabel("pre-training step")
    ax_steps.set_ylabel("validation loss", color="tab:red")
    ax_acc = ax_steps.twinx()
    ax_acc.plot(steps, [100 * v for v in table["top1"].to_list()], "s-", color="tab:blue")
    ax_acc.set_ylabel("probe top-1 (%)", color="tab:blue")
    ax_steps.set_title("over pre-training")
    ax_scatter.scatter(
        table["val_loss"].to_list(),
        [100 * v for v in table["top1"].to_list()],
        c=steps,
        cmap="viridis",
    )
    for step, loss, top1 in table.select("step", "val_loss", "top1").iter_rows():
        ax_scatter.annotate(
            str(step), (loss, 100 * top1), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    rho = loss_vs_accuracy_summary.get("spearman")
    rho_text = "n/a" if rho is None else f"{rho:.2f}"
    ax_scatter.set_title(f"Spearman rho = {rho_text} (n = {loss_vs_accuracy_summary.get('n')})")
    ax_scatter.set_xlabel("validation loss")
    ax_scatter.set_ylabel("probe top-1 (%)")
    fig.suptitle(loss_vs_accuracy_summary.get("probe", ""), fontsize=9)
    logger.info("plot_loss_vs_accuracy: %d points, rho %s", table.height, rho_text)
    return fig
