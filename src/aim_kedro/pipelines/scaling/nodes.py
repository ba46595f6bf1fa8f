"""Nodes of the ``scaling`` pipeline: thin glue over ``aim_kedro.aim.scaling`` and ``studies``.

A grid point pre-trains and probes with the pretraining and evaluation pipelines' own nodes
(``pretrain_aim``, ``load_trunk``, ``extract_probe_features``, ``train_probes``, ...) in its
namespace; the nodes here check the grid once, take each data size's subset of ``dfn_subset``,
and gather every point into ``scaling_results``, ``scaling_curves`` and ``scaling_summary``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import polars as pl

from aim_kedro.aim import studies
from aim_kedro.aim.scaling import (
    BUDGET,
    ScalingConfig,
    curves,
    data_subset,
    result_row,
    results_table,
)
from aim_kedro.io.shards import Sample, ShardSet
from aim_kedro.pipelines.evaluation.nodes import PROBE_BLOCKS

logger = logging.getLogger(__name__)


def point_key(capacity: str, run: str) -> str:
    """How a point's artifacts are named inside the grid's nodes: ``w32.d25_s0``."""
    return f"{capacity}.{run}"


def built_shape(cfg: ScalingConfig) -> dict[str, tuple[str, ...]]:
    """What the pipeline's namespaces depend on: the points, the data sizes, the whole ones."""
    return {"points": tuple(point_key(p.capacity, p.run) for p in cfg.points()),
            "data_sizes": tuple(cfg.data_sizes),
            "whole": tuple(name for name in cfg.data_sizes if cfg.whole(name))}


def validate_scaling_params(
    scaling: dict[str, Any], pretraining: dict[str, Any], evaluation: dict[str, Any], *,
    shape: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Check ``params:scaling`` over the pretraining and evaluation blocks before any work.

    Returns each point's ``PretrainingConfig`` (``point.<capacity>.<run>``), each data size's
    settings (``data.<name>``) and the evaluation blocks every point's probes use
    (``eval.<block>``). ``shape`` is :func:`built_shape` of the grid the pipeline was built
    with: parameters of another shape fail, since each point is a namespace of the pipeline.
    """
    cfg = ScalingConfig.from_params(scaling)
    grid = cfg.points()
    names = [point_key(p.capacity, p.run) for p in grid]
    runtime = built_shape(cfg)
    if {k: sorted(v) for k, v in runtime.items()} != {k: sorted(v) for k, v in shape.items()}:
        raise ValueError(
            f"params:scaling ({cfg.where}) gives the points {list(runtime['points'])}, data "
            f"sizes {list(runtime['data_sizes'])} (all of dfn_subset: {list(runtime['whole'])}), "
            f"but the scaling pipeline was built with {list(shape['points'])}, "
            f"{list(shape['data_sizes'])} ({list(shape['whole'])}): the grid's shape is read "
            "from conf/base and conf/local (or $KEDRO_ENV) parameters_scaling.yml when the "
            "project loads, so change it there, or run with KEDRO_ENV=<env> instead of --env "
            "(--params may change the other values)"
        )
    settings = {f"point.{name}": cfg.point_pretraining(p, pretraining)
                for name, p in zip(names, grid, strict=True)}
    val_percent = next(iter(settings.values())).val_percent
    blocks = cfg.probe_evaluation(evaluation)
    logger.info("scaling: %d capacities x %d data sizes x %d seeds = %d runs of %d steps (%s)",
                len(cfg.capacities), len(cfg.data_sizes), len(cfg.seeds), len(grid), cfg.steps,
                BUDGET)
    return {
        **settings,
        **{f"data.{name}": {"name": name, "size": size, "val_percent": val_percent,
                            "where": f"{cfg.where}.data_sizes.{name}"}
           for name, size in cfg.data_sizes.items()},
        **{f"eval.{block}": getattr(blocks, block) for block in PROBE_BLOCKS},
    }


def take_data_size(
    dfn_subset: ShardSet | str, data_settings: Mapping[str, Any]
) -> tuple[Iterator[Sample], dict[str, Any]]:
    """One data size of ``dfn_subset``: its held-out split and its share of the training images
    (nested across sizes), streamed into the size's shards, and what it holds."""
    shard_set = ShardSet.open(dfn_subset) if isinstance(dfn_subset, str) else dfn_subset
    if not shard_set.shards:
        raise ValueError(f"dfn_subset at {shard_set.path} holds no shards: run the curation pipeline")
    samples, summary = data_subset(shard_set, data_settings["size"],
                                   float(data_settings["val_percent"]), data_settings["where"])
    return samples, {"name": data_settings["name"], **summary}


def count_data_size(dfn_subset: ShardSet | str, data_settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the data size that is all of ``dfn_subset`` holds (its points read ``dfn_subset``
    itself: nothing is copied)."""
    return take_data_size(dfn_subset, data_settings)[1]


def collect_scaling_results(
    scaling: dict[str, Any], pretraining: dict[str, Any], **artifacts: Any
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``scaling_results`` (one row per point and seed) and ``scaling_curves`` (validation loss
    over training) from every point's ``training_history`` and ``probe_metrics``.

    ``artifacts`` holds ``<capacity>.<run>.training_history``, ``<capacity>.<run>.probe_metrics``
    and ``data.<name>.data_size``.
    """
    cfg = ScalingConfig.from_params(scaling)
    rows, tables = [], []
    for point in cfg.points():
        key = point_key(point.capacity, point.run)
        history = artifacts[f"{key}.training_history"]
        rows.append(result_row(point, cfg.point_pretraining(point, pretraining),
                               artifacts[f"data.{point.data}.data_size"], history,
                               artifacts[f"{key}.probe_metrics"]))
        tables.append(curves(point, history))
    results = results_table(rows)
    logger.info("collect_scaling_results: %d runs, final val loss %.4f .. %.4f", results.height,
                results["final_val_loss"].min(), results["final_val_loss"].max())
    return results, pl.concat(tables)


def summarise_scaling(scaling_results: pl.DataFrame) -> dict[str, Any]:
    """``scaling_summary``: power-law fits, Spearman's rho over every run, the findings."""
    return studies.scaling_summary(scaling_results, BUDGET)
