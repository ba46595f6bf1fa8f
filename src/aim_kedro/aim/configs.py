"""Typed configs of the ``pretraining`` and ``evaluation`` parameter blocks.

One dataclass per YAML block of ``conf/base/parameters_pretraining.yml`` and
``parameters_evaluation.yml``, with the same field names and the same defaults, built with
``common.config.from_mapping`` (an unknown key at any depth fails naming
``evaluation.<block>.<key>`` and the closest valid key) and checked once per run by
``from_params``. Keys that became catalog entries fail with the entry to use instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from aim_kedro.aim.features import LayerSpec, check_layer_spec
from aim_kedro.aim.probe_views import ViewAugmentation
from aim_kedro.aim.probes import PROBE_KINDS, ProbeProtocol, ProbeTraining
from aim_kedro.aim.train import TrainConfig
from aim_kedro.common.config import from_mapping

logger = logging.getLogger(__name__)

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PROBE_RECIPES = ("cached", "aim_paper")
_PROBE_SETS = ("the labelled sets are the catalog entries probe_train / probe_test: point them "
               "at an aim_kedro.datasets.ImageFolderDataset (one folder per class) or "
               "WebDatasetShards folder in conf/local/catalog.yml")
REMOVED = {
    "pretraining.run_dir": "the run directory is the catalog entry `pretraining_run`; set its "
                           "filepath in conf/local/catalog.yml",
    "pretraining.secondary_shards": "the mixed-in shards are the catalog entry `secondary_pool` "
                                    "(point its filepath at the shard folder in "
                                    "conf/local/catalog.yml; an absent folder mixes nothing)",
    "pretraining.train.base_lr": "set pretraining.train.lr (the peak lr at base_batch_size) with "
                                 "lr_scaling: linear for the linear scaling rule",
    "evaluation.trunk.source": "`kedro run --pipelines evaluation` probes `aim_checkpoint`, "
                               "`--pipelines evaluation_ml_aim` the catalog entry "
                               "`ml_aim_checkpoint`",
    "evaluation.trunk.path": "point the catalog entry `ml_aim_checkpoint` at the file in "
                             "conf/local/catalog.yml",
    "evaluation.dataset.kind": _PROBE_SETS,
    "evaluation.dataset.train_path": _PROBE_SETS,
    "evaluation.dataset.test_path": _PROBE_SETS,
}


def check_removed(params: Mapping[str, Any], where: str) -> None:
    """Fail on keys an older conf still sets that are now catalog entries, saying which."""
    found: dict[str, str] = {}
    for path, fix in REMOVED.items():
        block, *parents, key = path.split(".")
        node: Any = params if block == where else None
        for parent in parents:
            node = node.get(parent) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and key in node:
            found[path] = fix
    if found:
        paths = " and ".join(found)
        fixes = "; ".join(dict.fromkeys(found.values()))
        verb = "is no longer a parameter" if len(found) == 1 else "are no longer parameters"
        raise ValueError(f"{paths} {verb}: {fixes}")


def _fail(param: str, problem: str, fix: str) -> NoReturn:
    raise ValueError(f"{param} {problem}; {fix}")


def _positive_int(param: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(param, f"is {value!r}", "use a positive integer" + (" or null" if allow_none else ""))


def _number(param: str, value: Any, low: float, high: float, closed: bool) -> float:
    """A number in [low, high) (or [low, high] when ``closed``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (low <= value <= high if closed else low <= value < high):
        _fail(param, f"must be a number in [{low:g}, {high:g}{']' if closed else ')'}, got {value!r}",
              f"see conf/base/parameters_{param.split('.')[0]}.yml")
    return float(value)


@dataclass
class PretrainingConfig:
    """``pretraining``: how many GPUs, the held-out share, the secondary mix, and the run."""

    num_gpus: int = 1
    val_percent: float = 5.0
    secondary_p: float = 0.2
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PretrainingConfig:
        """Build and check ``params:pretraining`` (ValueError naming the parameter and the fix)."""
        check_removed(params, "pretraining")
        if "train" in params and not isinstance(params["train"], Mapping):
            _fail("pretraining.train", "must be a mapping of training knobs", "see TrainConfig")
        try:
            cfg = from_mapping(cls, params, "pretraining")
        except TypeError as exc:
            raise ValueError(f"pretraining.train: {exc}") from exc
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every knob, the training config for ``num_gpus`` ranks, and the visible GPUs."""
        _positive_int("pretraining.num_gpus", self.num_gpus)
        try:
            self.train.validate(world_size=self.num_gpus)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"pretraining.train: {exc}") from exc
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.num_gpus > 1 and self.train.device != "cpu" and 0 < visible < self.num_gpus:
            _fail("pretraining.num_gpus", f"is {self.num_gpus} but {visible} GPU(s) are visible",
                  "lower num_gpus")
        self.val_percent = _number("pretraining.val_percent", self.val_percent, 0.0, 100.0, False)
        self.secondary_p = _number("pretraining.secondary_p", self.secondary_p, 0.0, 1.0, True)
        if self.val_percent == 0.0:
            logger.warning("pretraining.val_percent is 0: no validation loss will be recorded")


@dataclass(frozen=True)
class MlAimTrunkConfig:
    """The AIM v1 config of a published checkpoint (``ml_aim_checkpoint``), e.g. aim-600M."""

    img_size: int
    patch_size: int
    embed_dim: int
    num_blocks: int
    num_heads: int
    probe_layers: int | list[int]
    num_classes: int

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``interop.from_ml_aim``."""
        return dataclasses.asdict(self)


@dataclass
class TrunkConfig:
    """``evaluation.trunk``: the published checkpoint's config (the evaluation_ml_aim pipeline)."""

    config: MlAimTrunkConfig | None = None

    def ml_aim(self) -> MlAimTrunkConfig:
        """The AIM v1 config, which probing a published checkpoint needs."""
        if self.config is None:
            _fail("evaluation.trunk.config", "is null",
                  "the evaluation_ml_aim pipeline needs the published checkpoint's {img_size, "
                  "patch_size, embed_dim, num_blocks, num_heads, probe_layers, num_classes}")
        return self.config


@dataclass
class DatasetConfig:
    """``evaluation.dataset``: the class count of shard sets (null scans the labels once)."""

    num_classes: int | None = None


@dataclass
class FeaturesConfig:
    """``evaluation.features``: which blocks, batch size, cached dtype, eval crop, threads."""

    layers: LayerSpec = "last6"
    batch_size: int = 128
    dtype: str = "float16"
    crop_pct: float = 1.0
    cpu_threads: int | None = None

    @property
    def store_dtype(self) -> torch.dtype:
        """The torch dtype cached tokens are stored in."""
        return STORE_DTYPES[self.dtype]


@dataclass
class RandomInitConfig:
    """``evaluation.random_init``: the baseline trunk's init seed."""

    seed: int = 0


@dataclass
class LowShotConfig:
    """``evaluation.probes.low_shot``: labelled images per class, one draw per seed."""

    shots: int = 10
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class ProbesConfig:
    """``evaluation.probes``: kinds, lr sweeps, optimisation and low-shot draws."""

    kinds: list[str] = field(default_factory=lambda: list(PROBE_KINDS))
    lrs: dict[str, list[float]] = field(default_factory=lambda: ProbeProtocol().lrs)
    weight_decay: dict[str, float] = field(default_factory=lambda: ProbeProtocol().weight_decay)
    val_fraction: float = 0.2
    epochs: int = 20
    min_steps: int = 200
    batch_size: int = 64
    warmup_fraction: float = 0.1
    seed: int = 0
    cpu_threads: int | None = 1
    low_shot: LowShotConfig = field(default_factory=LowShotConfig)

    def protocol(self, device: str) -> ProbeProtocol:
        """The ``ProbeProtocol`` this block describes, fits on ``device``."""
        training = ProbeTraining(epochs=int(self.epochs), min_steps=int(self.min_steps),
                                 batch_size=int(self.batch_size),
                                 warmup_fraction=float(self.warmup_fraction), device=device)
        return ProbeProtocol(
            kinds=tuple(self.kinds),
            lrs={k: [float(v) for v in vs] for k, vs in self.lrs.items()},
            weight_decay={k: float(v) for k, v in self.weight_decay.items()},
            val_fraction=float(self.val_fraction),
            shots=int(self.low_shot.shots),
            shot_seeds=tuple(int(s) for s in self.low_shot.seeds),
            seed=int(self.seed),
            training=training,
        )

    def validate(self) -> None:
        """Check kinds, lr grids, fractions, counts and threads."""
        kinds = list(self.kinds)
        if not kinds or any(k not in PROBE_KINDS for k in kinds):
            _fail("evaluation.probes.kinds", f"holds {kinds}",
                  f"use a non-empty subset of {list(PROBE_KINDS)}")
        for kind in kinds:
            values = (self.lrs or {}).get(kind)
            if not values or any(float(v) <= 0 for v in values):
                _fail(f"evaluation.probes.lrs.{kind}", f"is {values!r}",
                      "give a non-empty list of positive learning rates")
        if not 0.0 < float(self.val_fraction) < 1.0:
            _fail("evaluation.probes.val_fraction", f"is {self.val_fraction}",
                  "use a fraction in (0, 1), e.g. 0.2")
        if int(self.low_shot.shots) < 1 or not self.low_shot.seeds:
            _fail("evaluation.probes.low_shot", f"is {dataclasses.asdict(self.low_shot)}",
                  "give shots >= 1 and a non-empty list of seeds")
        for key in ("epochs", "batch_size", "cpu_threads"):
            _positive_int(f"evaluation.probes.{key}", getattr(self, key), key == "cpu_threads")
        _number("evaluation.probes.warmup_fraction", self.warmup_fraction, 0.0, 1.0, False)


@dataclass
class AimPaperConfig:
    """``evaluation.aim_paper``: the paper's probe recipe (``evaluation.recipe: aim_paper``):
    every probe fits on augmented views through the frozen trunk for ``epochs`` (lr sweep,
    low-shot draws and batch size as ``evaluation.probes``), with this weight decay for every
    kind and gradient clipping; features are extracted at ``crop_pct`` (0.875: resize 256,
    centre 224)."""

    epochs: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 3.0
    crop_pct: float = 0.875
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = True
    color_jitter: float = 0.3
    randaugment: bool = True

    def augmentation(self) -> ViewAugmentation:
        """How training views are drawn."""
        return ViewAugmentation(tuple(self.scale), bool(self.flip), float(self.color_jitter),
                                bool(self.randaugment))

    def protocol(self, probes: ProbesConfig, device: str) -> ProbeProtocol:
        """``probes``'s protocol with this recipe's epochs, weight decay and clipping."""
        base = probes.protocol(device)
        training = dataclasses.replace(base.training, epochs=int(self.epochs),
                                       grad_clip=float(self.grad_clip))
        return dataclasses.replace(base, training=training,
                                   weight_decay={k: float(self.weight_decay) for k in base.kinds})

    def validate(self) -> None:
        """Check counts, numbers and the augmentation."""
        _positive_int("evaluation.aim_paper.epochs", self.epochs)
        _number("evaluation.aim_paper.weight_decay", self.weight_decay, 0.0, 1.0, True)
        _number("evaluation.aim_paper.grad_clip", self.grad_clip, 0.0, float("inf"), False)
        _number("evaluation.aim_paper.crop_pct", self.crop_pct, 0.0, 1.0, True)
        _number("evaluation.aim_paper.color_jitter", self.color_jitter, 0.0, 1.0, True)
        for key in ("flip", "randaugment"):
            if not isinstance(getattr(self, key), bool):
                _fail(f"evaluation.aim_paper.{key}", f"is {getattr(self, key)!r}", "use true or false")
        try:
            self.augmentation()
        except (TypeError, ValueError) as exc:
            _fail("evaluation.aim_paper.scale", f"is {self.scale!r} ({exc})",
                  "give [low, high] with 0 < low <= high <= 1, e.g. [0.08, 1.0]")


@dataclass
class LossVsAccuracyConfig:
    """``evaluation.loss_vs_accuracy``: the fixed-lr probe fitted per intermediate checkpoint."""

    kind: str = "attentive"
    lr: float = 1e-2
    shots: int | None = 10
    max_checkpoints: int | None = 10


@dataclass
class EvaluationConfig:
    """``evaluation``: the device and one block per stage of probing."""

    device: str = "auto"
    recipe: str = "cached"
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    random_init: RandomInitConfig = field(default_factory=RandomInitConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    aim_paper: AimPaperConfig = field(default_factory=AimPaperConfig)
    loss_vs_accuracy: LossVsAccuracyConfig = field(default_factory=LossVsAccuracyConfig)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> EvaluationConfig:
        """Build and check ``params:evaluation``; ``device: auto`` becomes ``cuda`` or ``cpu``."""
        check_removed(params, "evaluation")
        for name in ("trunk", "dataset", "features", "random_init", "probes", "aim_paper",
                     "loss_vs_accuracy"):
            if params.get(name) is None:
                params = {**params, name: {}}
            elif not isinstance(params[name], Mapping):
                _fail(f"evaluation.{name}", f"must be a mapping, got {params[name]!r}",
                      "see conf/base/parameters_evaluation.yml")
        cfg = from_mapping(cls, params, "evaluation")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every block and resolve the device."""
        features = self.features
        try:
            check_layer_spec(features.layers)
        except ValueError as exc:
            _fail("evaluation.features.layers", f"is {features.layers!r} ({exc})",
                  "see parameters_evaluation.yml")
        _positive_int("evaluation.features.batch_size", features.batch_size)
        _positive_int("evaluation.features.cpu_threads", features.cpu_threads, allow_none=True)
        if features.dtype not in STORE_DTYPES:
            _fail("evaluation.features.dtype", f"is {features.dtype!r}",
                  f"use one of {list(STORE_DTYPES)}")
        _number("evaluation.features.crop_pct", features.crop_pct, 0.0, 1.0, True)
        _positive_int("evaluation.dataset.num_classes", self.dataset.num_classes, allow_none=True)
        self.probes.validate()
        self.aim_paper.validate()
        if self.recipe not in PROBE_RECIPES:
            _fail("evaluation.recipe", f"is {self.recipe!r}", f"use one of {list(PROBE_RECIPES)}")
        if self.recipe == "aim_paper" and features.crop_pct != self.aim_paper.crop_pct:
            logger.info("evaluation.recipe aim_paper: eval view crop_pct %g (evaluation.aim_paper)",
                        self.aim_paper.crop_pct)
            features.crop_pct = float(self.aim_paper.crop_pct)
        lva = self.loss_vs_accuracy
        if lva.kind not in PROBE_KINDS or not float(lva.lr) > 0:
            _fail("evaluation.loss_vs_accuracy", f"is {dataclasses.asdict(lva)}",
                  f"use kind in {list(PROBE_KINDS)} and a positive lr")
        _positive_int("evaluation.loss_vs_accuracy.shots", lva.shots, allow_none=True)
        _positive_int("evaluation.loss_vs_accuracy.max_checkpoints", lva.max_checkpoints,
                      allow_none=True)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda"):
            _fail("evaluation.device", f"is {self.device!r}", "use 'auto', 'cpu' or 'cuda'")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            _fail("evaluation.device", f"is {self.device!r} but no CUDA device is available",
                  "use 'auto' or 'cpu'")
