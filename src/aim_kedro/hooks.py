"""Project hooks: a bad config or a missing input fails before any node does work."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

logger = logging.getLogger(__name__)

# Parameter block -> the function that checks it (raises ValueError/FileNotFoundError naming
# the parameter and the fix). Each pipeline's nodes module owns its validator.
VALIDATORS: dict[str, str] = {
    "sample": "aim_kedro.pipelines.sample.nodes:validate_sample_params",
    "curation": "aim_kedro.pipelines.curation.nodes:validate_curation_params",
    "pretraining": "aim_kedro.pipelines.pretraining.nodes:validate_pretraining_params",
    "evaluation": "aim_kedro.pipelines.evaluation.nodes:validate_evaluation_params",
}

# Node -> (parameter block, a check of what the node will load), run only when the node is in
# the run: e.g. an open_clip model that would need a download while offline fails up front.
PREFLIGHT: dict[str, tuple[str, str]] = {
    "score_pool": ("curation", "aim_kedro.pipelines.curation.nodes:check_scoring_model"),
}


def _resolve(path: str) -> Callable[[dict[str, Any]], Any] | None:
    module_name, func_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return None
    return getattr(module, func_name, None)


def parameter_blocks(pipeline: Pipeline) -> set[str]:
    """Top-level parameter keys a pipeline reads (``params:curation.filters`` -> ``curation``)."""
    blocks = set()
    for name in pipeline.inputs() | {i for n in pipeline.nodes for i in n.inputs}:
        if name.startswith("params:"):
            blocks.add(name[len("params:") :].split(".")[0])
    return blocks


def missing_inputs(pipeline: Pipeline, catalog: Any) -> list[str]:
    """Free inputs of the run (not parameters, not made by the run) that hold no data."""
    missing = []
    for name in sorted(pipeline.inputs()):
        if name.startswith("params:") or name == "parameters":
            continue
        try:
            if not catalog.exists(name):
                missing.append(name)
        except Exception as exc:  # noqa: BLE001 - report any dataset that cannot be reached
            missing.append(f"{name} ({exc})")
    return missing


class ValidateBeforeRunHooks:
    """Check the parameters of every pipeline in the run, and that its inputs exist, up front."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        parameters = catalog.load("parameters") if "parameters" in catalog else {}
        for block in sorted(parameter_blocks(pipeline)):
            validator = _resolve(VALIDATORS[block]) if block in VALIDATORS else None
            if validator is None or block not in parameters:
                continue
            validator(parameters[block])
            logger.info("parameters '%s' checked", block)
        # The resolution contract (issue 13): no stage upscales what the one before it wrote.
        from aim_kedro.resolution import check_resolution

        check_resolution(parameters, parameter_blocks(pipeline))
        for node_name in sorted({n.name for n in pipeline.nodes} & set(PREFLIGHT)):
            block, path = PREFLIGHT[node_name]
            check = _resolve(path)
            if check is not None and block in parameters:
                check(parameters[block])
        missing = missing_inputs(pipeline, catalog)
        if missing:
            raise FileNotFoundError(
                "these catalog inputs of the run hold no data: "
                + ", ".join(missing)
                + ". Run the pipeline that makes them first (`kedro run --pipeline sample` makes "
                "the raw pool and probe sets), or point the entries at your data in "
                "conf/local/catalog.yml."
            )
