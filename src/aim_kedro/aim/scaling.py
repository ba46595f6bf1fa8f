"""The scaling grid (the paper's first finding): capacities x data sizes x seeds.

``params:scaling`` holds named grids (``grids``: ``sample`` on the embedded sample, ``paper``
with the paper's presets) and the one that runs (``grid``). Every point pre-trains the
``pretraining`` block with its grid's overrides, the point's capacity and seed, and the same
number of steps at every data size (equal steps: a smaller data size is seen for more epochs,
as in the paper, whose models all train for the same number of updates); its trunk is probed
with the ``evaluation`` block and the grid's overrides. A data size is a nested subset of the
training images of ``dfn_subset`` (ranked by a hash of the uid) beside its whole held-out
split, so every point is validated on the same images; 1.0 is ``dfn_subset`` itself. The fits
and Spearman's rho over the results are in :mod:`aim_kedro.aim.studies`.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from aim_kedro.aim.configs import EvaluationConfig, PretrainingConfig
from aim_kedro.aim.data import val_bucket
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import AIMConfig, get_config
from aim_kedro.common.config import check_keys, from_mapping
from aim_kedro.io.shards import Sample, sample_json
from aim_kedro.io.uids import declared_uid, sample_uid

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
RESERVED = ("data",)
BUDGET = "equal_steps"
DEFAULT_GRID = "sample"


@dataclass
class Capacity:
    """``capacities.<name>`` of a grid: a preset and its ``model_overrides`` (AIMConfig fields)."""

    preset: str = "aim_sample"
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> AIMConfig:
        """The architecture of this capacity."""
        return get_config(self.preset, **(self.model_overrides or {}))


def _width(embed_dim: int) -> Capacity:
    """A depth-4 ``aim_sample`` trunk of ``embed_dim`` (head dim 16, a pixel head of half width)."""
    return Capacity("aim_sample", {"embed_dim": embed_dim, "num_heads": embed_dim // 16,
                                   "head_embed_dim": embed_dim // 2})


@dataclass(frozen=True)
class GridPoint:
    """One pre-training run of the grid: a capacity, a data size and a seed (all by name)."""

    capacity: str
    data: str
    seed: int

    @property
    def run(self) -> str:
        """The data size and seed, ``d25_s0``: the run's name within its capacity."""
        return f"{self.data}_s{self.seed}"

    @property
    def label(self) -> str:
        """``w32/d25/s0``, for tables and logs."""
        return f"{self.capacity}/{self.data}/s{self.seed}"


@dataclass
class ScalingConfig:
    """One grid of ``scaling.grids``: capacities x data sizes x seeds, the equal step budget
    and the overrides every point shares.

    Defaults equal the ``sample`` grid of conf/base/parameters_scaling.yml. A data size is a
    fraction in (0, 1] of the training images of ``dfn_subset`` (a float) or a count of them
    (an int >= 2); 1.0 is ``dfn_subset`` itself.
    """

    capacities: dict[str, Capacity] = field(
        default_factory=lambda: {f"w{d}": _width(d) for d in (32, 48, 64, 96)})
    data_sizes: dict[str, float | int] = field(
        default_factory=lambda: {"d06": 0.0625, "d25": 0.25, "d100": 1.0})
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 250
    pretraining: dict[str, Any] = field(default_factory=lambda: {
        "val_percent": 10.0,
        "train": {"warmup_steps": 20, "keep_every": 0, "checkpoint_every": 0, "val_every": 50,
                  "log_every": 50},
    })
    evaluation: dict[str, Any] = field(default_factory=lambda: {
        "probes": {"lrs": {"attentive": [3.0e-3, 1.0e-2], "linear": [3.0e-3]}, "epochs": 10,
                   "min_steps": 100},
    })
    where: str = field(default="scaling.grids.sample", init=False, compare=False, repr=False)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> ScalingConfig:
        """The grid ``params:scaling`` selects (``grid``, one of ``grids``), checked; ValueError
        naming the parameter and the fix. Empty parameters give the defaults."""
        params = dict(params or {})
        check_keys(params, ("grid", "grids"), "scaling")
        name, grids = params.get("grid", DEFAULT_GRID), params.get("grids") or {}
        if not isinstance(grids, Mapping) or (name not in grids and grids):
            raise ValueError(f"scaling.grid is {name!r} but scaling.grids holds "
                             f"{sorted(grids) if isinstance(grids, Mapping) else grids!r}: name "
                             "one of them")
        return cls.from_grid(grids.get(name, {}), f"scaling.grids.{name}")

    @classmethod
    def from_grid(cls, grid: Mapping[str, Any] | None, where: str) -> ScalingConfig:
        """Build and check one grid block at the parameter path ``where``."""
        cfg = from_mapping(cls, grid, where)
        cfg.where = where
        if not isinstance(cfg.capacities, Mapping) or not cfg.capacities:
            raise ValueError(f"{where}.capacities must map names to {{preset, model_overrides}}")
        cfg.capacities = {
            str(name): value if isinstance(value, Capacity)
            else from_mapping(Capacity, value, f"{where}.capacities.{name}")
            for name, value in cfg.capacities.items()
        }
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check names, sizes, seeds, the step budget and every capacity's architecture."""
        where = self.where
        if not isinstance(self.data_sizes, Mapping) or not self.data_sizes:
            raise ValueError(f"{where}.data_sizes must map names to a fraction or a count of "
                             "dfn_subset's training images, e.g. {d25: 0.25, d100: 1.0}")
        for block, names in (("capacities", self.capacities), ("data_sizes", self.data_sizes)):
            for name in names:
                if not NAME.match(str(name)) or name in RESERVED:
                    raise ValueError(
                        f"{where}.{block}.{name}: a name is a letter then letters, digits or _ "
                        f"(it names a pipeline namespace), and not one of {list(RESERVED)}")
        for name, capacity in self.capacities.items():
            try:
                capacity.model_config()
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{where}.capacities.{name}: {exc}") from exc
        for name, size in self.data_sizes.items():
            data_size_count(size, None, f"{where}.data_sizes.{name}")
        seeds = list(self.seeds or [])
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ValueError(f"{where}.seeds is {self.seeds!r}: give a list of integers >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{where}.seeds {seeds} repeats a seed")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"{where}.steps is {self.steps!r}: give the steps of every point")
        for block in ("pretraining", "evaluation"):
            if not isinstance(getattr(self, block), Mapping):
                raise ValueError(f"{where}.{block} must be a mapping of {block} overrides")
        for key in ("preset", "model_overrides", "seed", "total_steps"):
            if key in (self.pretraining.get("train") or {}):
                raise ValueError(f"{where}.pretraining.train.{key} is set by the grid "
                                 "(capacities, seeds, steps): remove it")

    def points(self) -> list[GridPoint]:
        """Every point, capacity by capacity, then data size, then seed."""
        return [GridPoint(c, d, int(s)) for c in self.capacities for d in self.data_sizes
                for s in self.seeds]

    def whole(self, data: str) -> bool:
        """Whether data size ``data`` is all of ``dfn_subset`` (its points read it, no copy)."""
        size = self.data_sizes[data]
        return isinstance(size, float) and size == 1.0

    def point_pretraining(
        self, point: GridPoint, pretraining: Mapping[str, Any]
    ) -> PretrainingConfig:
        """``pretraining`` with this grid's overrides and the point's model, seed and steps."""
        capacity = self.capacities[point.capacity]
        params = merged(pretraining, self.pretraining)
        params["train"] = {**params.get("train", {}), "preset": capacity.preset,
                           "model_overrides": dict(capacity.model_overrides or {}),
                           "seed": point.seed, "total_steps": self.steps}
        try:
            return PretrainingConfig.from_params(params)
        except ValueError as exc:
            raise ValueError(f"scaling point {point.label} ({self.where}.pretraining over the "
                             f"pretraining block): {exc}") from exc

    def probe_evaluation(self, evaluation: Mapping[str, Any]) -> EvaluationConfig:
        """``evaluation`` with this grid's overrides: how every point's trunk is probed."""
        try:
            return EvaluationConfig.from_params(merged(evaluation, self.evaluation))
        except ValueError as exc:
            raise ValueError(f"{self.where}.evaluation (over the evaluation block): {exc}") from exc


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied key by key (nested mappings merged, not replaced)."""
    out = {key: dict(value) if isinstance(value, Mapping) else value
           for key, value in (base or {}).items()}
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def data_size_count(size: Any, available: int | None, where: str) -> int | None:
    """The count a data size asks for (None for a fraction), after checking it; ``available``
    training images exist (None: not known yet)."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ValueError(f"{where} is {size!r}: give a fraction in (0, 1] or a count >= 2")
    if isinstance(size, float):
        if not 0.0 < size <= 1.0:
            raise ValueError(f"{where} is {size}: a fraction is in (0, 1]; a count is an int")
        return None
    if size < 2:
        raise ValueError(f"{where} is {size}: a count is >= 2 (write 1.0 for all the images)")
    if available is not None and size > available:
        raise ValueError(f"{where} asks for {size} training images but dfn_subset holds "
                         f"{available}: lower it or give a fraction")
    return size


def subset_rank(uid: str) -> float:
    """Where a uid falls in [0, 1) in the order data sizes take training images: a fraction f
    takes the training images ranked below f, a count N the N lowest, so sizes nest."""
    digest = hashlib.blake2b(f"scaling/{uid}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def _with_uid(sample: Sample, uid: str) -> Sample:
    """The sample with its uid written into its ``.json``: a new shard must not change it."""
    meta = sample_json(sample)
    if declared_uid(meta) is not None:
        return sample
    return {**sample, "json": json.dumps({**meta, "uid": uid}).encode()}


def data_subset(
    samples: Iterable[Sample], size: float | int, val_percent: float, where: str
) -> tuple[Iterator[Sample], dict[str, Any]]:
    """The samples of one data size, streamed in order, and what they hold.

    ``samples`` is read twice (a ``ShardSet`` is): once to count (and, for a count N, to keep
    the N lowest-ranked uids, the only memory it needs), once to stream the held-out samples
    and the chosen training samples (:func:`subset_rank`).
    """
    train = held_out = below = 0
    lowest: list[tuple[float, str]] = []  # a max-heap (negated ranks) of the N lowest
    wanted = data_size_count(size, None, where)
    for sample in samples:
        uid = sample_uid(sample)
        if val_bucket(uid) < val_percent:
            held_out += 1
            continue
        train += 1
        rank = subset_rank(uid)
        if wanted is None:
            below += rank < size
        elif len(lowest) < wanted:
            heapq.heappush(lowest, (-rank, uid))
        elif rank < -lowest[0][0]:
            heapq.heapreplace(lowest, (-rank, uid))
    data_size_count(size, train, where)
    chosen = {uid for _, uid in lowest}
    count = below if wanted is None else len(chosen)
    summary = {"train_images": count, "available_train_images": train,
               "fraction": count / train if train else 0.0, "val_images": held_out,
               "val_percent": val_percent, "size": size}
    logger.info("%s: %d of %d training images (+%d held out)", where, count, train, held_out)

    def keep(uid: str) -> bool:
        if val_bucket(uid) < val_percent:
            return True
        return subset_rank(uid) < size if wanted is None else uid in chosen

    def stream() -> Iterator[Sample]:
        for sample in samples:
            uid = sample_uid(sample)
            if keep(uid):
                yield _with_uid(sample, uid)

    return stream(), summary


@functools.cache
def model_size(cfg: AIMConfig) -> dict[str, int]:
    """Trunk and total parameters, and forward FLOPs per image of the trunk and of the whole
    model (trunk + pixel head) at ``cfg.img_size``, as ``FlopCounterMode`` counts them (2 per
    multiply-add, attention dense), on the meta device: no memory, any size."""
    with torch.device("meta"):
        model = AIM(cfg)
        images = torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size)
        prefix = torch.ones(1, dtype=torch.long)
    with FlopCounterMode(display=False) as total:
        model(images, prefix)
    with FlopCounterMode(display=False) as trunk:
        model.trunk(images)
    return {"trunk_params": sum(p.numel() for p in model.trunk.parameters()),
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_image": int(total.get_total_flops()),
            "trunk_flops_per_image": int(trunk.get_total_flops())}


def result_row(
    point: GridPoint, settings: PretrainingConfig, data_size: Mapping[str, Any],
    history: pl.DataFrame, probe_metrics: Mapping[str, Any],
) -> dict[str, Any]:
    """One row of ``scaling_results``: the point, its size and budget, its final validation
    loss and probe top-1 (the pre-trained trunk, and ``random_`` for the random-init one)."""
    cfg = settings.train.model_config()
    validated = history.filter(pl.col("val_loss").is_not_null())
    trained = history.filter(pl.col("train_loss").is_not_null())
    steps = int(history["step"].max()) if history.height else 0
    sizes = model_size(cfg)
    images_seen = steps * settings.train.batch_size
    row = {
        "point": point.label, "capacity": point.capacity, "data": point.data, "seed": point.seed,
        "preset": settings.train.preset, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
        "num_heads": cfg.num_heads, **sizes,
        "train_images": int(data_size["train_images"]), "fraction": float(data_size["fraction"]),
        "val_images": int(data_size["val_images"]), "steps": steps,
        "batch_size": settings.train.batch_size, "images_seen": images_seen,
        "epochs": images_seen / max(int(data_size["train_images"]), 1),
        "train_flops": 3 * sizes["flops_per_image"] * images_seen,
        "final_val_loss": float(validated["val_loss"][-1]) if validated.height else None,
        "final_train_loss": float(trained["train_loss"][-1]) if trained.height else None,
    }
    for trunk, prefix in (("pretrained", ""), ("random_init", "random_")):
        for probe, entry in probe_metrics.get(trunk, {}).items():
            if isinstance(entry, Mapping) and "top1" in entry:
                row[f"{prefix}{probe}_top1"] = float(entry["top1"])
    return row


def results_table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """``scaling_results`` from :func:`result_row` rows (probe columns as the metrics name them)."""
    return pl.DataFrame(rows, infer_schema_length=None).sort("trunk_params", "train_images",
                                                             "seed")


def curves(point: GridPoint, history: pl.DataFrame) -> pl.DataFrame:
    """The validation loss over training of one point: ``scaling_curves`` rows."""
    rows = history.filter(pl.col("val_loss").is_not_null()).select("step", "val_loss")
    return rows.with_columns(point=pl.lit(point.label), capacity=pl.lit(point.capacity),
                             data=pl.lit(point.data), seed=pl.lit(point.seed, pl.Int64))


def by_size(results: pl.DataFrame, name: str, size: str) -> dict[str, int]:
    """``{name: size}`` in increasing size: capacities by ``trunk_params``, data sizes by
    ``train_images``."""
    rows = results.group_by(name).agg(pl.col(size).first()).sort(size)
    return dict(zip(rows[name].to_list(), [int(v) for v in rows[size]], strict=True))


def low_shot_column(results: pl.DataFrame, kind: str = "attentive") -> str:
    """The low-shot top-1 column of ``kind`` (``attentive_10shot_top1`` with 10 shots)."""
    found = [c for c in results.columns if re.fullmatch(rf"{kind}_\d+shot_top1", c)]
    if not found:
        raise ValueError(f"scaling_results has no {kind} low-shot column: {results.columns}")
    return found[0]


__all__ = ["BUDGET", "Capacity", "GridPoint", "ScalingConfig", "by_size", "curves", "data_size_count",
           "data_subset", "low_shot_column", "merged", "model_size", "result_row",
           "results_table"]
