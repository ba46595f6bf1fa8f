"""The ``scaling`` pipeline: the pretraining and evaluation nodes in one namespace per grid point.

``scaling.data.<data>`` takes each data size of ``dfn_subset`` (a data size of 1.0 is
``dfn_subset`` itself, only counted); ``scaling.<capacity>.<data>_s<seed>`` pre-trains on it
(``pretrain_aim``) and probes the trunk (``load_trunk``, ``extract_probe_features``,
``extract_random_init_features``, ``train_probes``); the ``scaling`` nodes check the grid first
and gather, fit and plot last. Every point's artifacts are versioned catalog entries of its
namespace (dataset factories in conf/base/catalog_scaling.yml).

The grid's shape (its names, and which data sizes are all of ``dfn_subset``) decides the
namespaces, so it is read from the project's parameters when the pipeline is built: conf/base,
then conf/local or ``$KEDRO_ENV``, merged as ``settings.py`` merges them.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from kedro.pipeline import Pipeline, node
from kedro.utils import find_kedro_project

from aim_kedro import settings
from aim_kedro.aim.scaling import GridPoint, ScalingConfig
from aim_kedro.aim.scaling_plots import plot_loss_curves, plot_loss_vs_params, plot_probes_vs_params
from aim_kedro.pipelines import evaluation, pretraining
from aim_kedro.pipelines.evaluation.nodes import PROBE_BLOCKS
from aim_kedro.pipelines.evaluation.pipeline import config_name
from aim_kedro.pipelines.scaling.nodes import (
    built_shape,
    collect_scaling_results,
    count_data_size,
    point_key,
    summarise_scaling,
    take_data_size,
    validate_scaling_params,
)

logger = logging.getLogger(__name__)

NAMESPACE = "scaling"
TAG = "scaling"
PROBE_NODES = ("load_trunk", "extract_probe_features", "extract_random_init_features",
               "train_probes")


def point_namespace(point: GridPoint) -> str:
    """``scaling.<capacity>.<data>_s<seed>``: where a point's nodes and artifacts live."""
    return f"{NAMESPACE}.{point.capacity}.{point.run}"


def data_namespace(name: str) -> str:
    """``scaling.data.<name>``: where a data size's subset of ``dfn_subset`` lives."""
    return f"{NAMESPACE}.data.{name}"


def project_grid() -> ScalingConfig | None:
    """The grid of the project the working directory is in (the dataclass defaults, which equal
    conf/base, outside a project); None, with a warning, when its parameters are invalid: the
    pipeline's parameter check then names the problem when the pipeline runs."""
    root = find_kedro_project(Path.cwd())
    if root is None:
        return ScalingConfig()
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(Path(root) / getattr(settings, "CONF_SOURCE", "conf")),
        env=os.environ.get("KEDRO_ENV"), **settings.CONFIG_LOADER_ARGS,
    )
    try:
        return ScalingConfig.from_params(loader["parameters"].get(NAMESPACE))
    except ValueError as exc:
        logger.warning("the scaling pipeline holds only its parameter check: %s", exc)
        return None


def _validate_node(grid: ScalingConfig | None) -> Pipeline:
    points = grid.points() if grid else []
    data_sizes = list(grid.data_sizes) if grid else []
    outputs = {
        **{f"point.{point_key(p.capacity, p.run)}": f"{point_namespace(p)}.pretraining_settings"
           for p in points},
        **{f"data.{name}": f"{data_namespace(name)}.data_settings" for name in data_sizes},
        **{f"eval.{block}": f"{NAMESPACE}.{config_name(block)}" for block in PROBE_BLOCKS},
    }
    shape = built_shape(grid) if grid else {"points": (), "data_sizes": (), "whole": ()}
    check = functools.update_wrapper(
        functools.partial(validate_scaling_params, shape=shape), validate_scaling_params)
    return Pipeline([node(check, inputs={"scaling": "params:scaling",
                                         "pretraining": "params:pretraining",
                                         "evaluation": "params:evaluation"},
                          outputs=outputs if grid else None, name="validate_scaling_params",
                          namespace=NAMESPACE)])


def _data_pipeline(grid: ScalingConfig) -> Pipeline:
    """Each data size below all of ``dfn_subset`` written as its own shards; each size counted."""
    return Pipeline([
        Pipeline([node(count_data_size, inputs=["dfn_subset", "data_settings"],
                       outputs="data_size", name="count_data_size")
                  if grid.whole(name) else
                  node(take_data_size, inputs=["dfn_subset", "data_settings"],
                       outputs=["subset", "data_size"], name="take_data_size")],
                 namespace=data_namespace(name), inputs={"dfn_subset": "dfn_subset"})
        for name in grid.data_sizes
    ])


def _point_pipeline(grid: ScalingConfig, point: GridPoint, nodes: Pipeline) -> Pipeline:
    """``nodes`` (the pretraining and evaluation pipelines' own) for one point, in its namespace."""
    shared = {config_name(block): f"{NAMESPACE}.{config_name(block)}"
              for block in PROBE_BLOCKS if config_name(block) in nodes.inputs()}
    return Pipeline(
        nodes, namespace=point_namespace(point),
        inputs={"dfn_subset": "dfn_subset" if grid.whole(point.data)
                else f"{data_namespace(point.data)}.subset",
                "secondary_pool": "secondary_pool", "eval_sets": f"{NAMESPACE}.eval_sets",
                **shared},
    )


def _gather(grid: ScalingConfig) -> Pipeline:
    artifacts = {
        **{f"{point_key(p.capacity, p.run)}.{name}": f"{point_namespace(p)}.{name}"
           for p in grid.points() for name in ("training_history", "probe_metrics")},
        **{f"data.{name}.data_size": f"{data_namespace(name)}.data_size"
           for name in grid.data_sizes},
    }
    steps = [
        (collect_scaling_results,
         {"scaling": "params:scaling", "pretraining": "params:pretraining", **artifacts},
         ["scaling_results", "scaling_curves"], "collect_scaling_results"),
        (summarise_scaling, "scaling_results", "scaling_summary", "summarise_scaling"),
        (plot_loss_vs_params, ["scaling_results", "scaling_summary"], "scaling_loss_plot",
         "plot_loss_vs_params"),
        (plot_probes_vs_params, "scaling_results", "scaling_probe_plot", "plot_probes_vs_params"),
        (plot_loss_curves, ["scaling_curves", "scaling_results"], "scaling_curves_plot",
         "plot_loss_curves"),
    ]
    return Pipeline([node(func, inputs=inputs, outputs=outputs, name=name, namespace=NAMESPACE)
                     for func, inputs, outputs, name in steps])


def create_pipeline(**kwargs) -> Pipeline:
    """Check the grid, take the data sizes, pre-train and probe every point, gather.

    ``create_pipeline(grid=ScalingConfig(...))`` builds another grid than the project's.
    """
    grid = kwargs["grid"] if "grid" in kwargs else project_grid()
    validate = _validate_node(grid)
    if grid is None:
        return Pipeline(validate, tags=[TAG])
    data = _data_pipeline(grid)
    eval_sets = Pipeline(evaluation.create_pipeline().only_nodes("load_eval_sets"),
                         namespace=NAMESPACE,
                         inputs={"probe_train": "probe_train", "probe_test": "probe_test"})
    nodes = (pretraining.create_pipeline().only_nodes("pretrain_aim")
             + evaluation.create_pipeline().only_nodes(*PROBE_NODES))
    points = Pipeline([_point_pipeline(grid, point, nodes) for point in grid.points()])
    return Pipeline(validate + data + eval_sets + points + _gather(grid), tags=[TAG])
