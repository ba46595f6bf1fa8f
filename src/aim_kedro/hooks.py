"""Project hooks: a bad config or a missing input fails before any node does work, two runs never
write the same entries at once, and every run leaves a ``run_manifest`` of what it read and wrote.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import DatasetError
from kedro.pipeline import Pipeline

from aim_kedro.checks import (
    catalog_sources,
    check_inputs,
    check_top_level,
    expected,
    file_parameters,
    parameter_blocks,
    runtime_paths,
)
from aim_kedro.lineage import (
    MANIFEST,
    Producer,
    RunRecord,
    align_groups,
    dataset_of,
    filepath_of,
    is_versioned,
    load_version,
    producers,
    registered_pipelines,
)
from aim_kedro.runguard import RunGuard

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

# Errors of these kinds, raised by the checks, are configuration problems: the CLI prints their
# message alone (see ``aim_kedro.cli``).
EXPECTED = (ValueError, LookupError, OSError, DatasetError, RuntimeError)

_nodes_started = False


def nodes_started() -> bool:
    """Whether a node of this process's current run has started (errors before that are
    configuration errors)."""
    return _nodes_started


def _resolve(path: str) -> Callable[[dict[str, Any]], Any] | None:
    module_name, func_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return None
    return getattr(module, func_name, None)


def _producers(pipeline: Pipeline, run_params: dict[str, Any]) -> dict[str, Producer]:
    """Who makes each entry, from every registered pipeline, the run's own named first (the
    run's alone when the registry cannot be loaded whole)."""
    try:
        return producers(registered_pipelines(), prefer=run_params.get("pipeline_names") or ())
    except Exception as exc:  # noqa: BLE001 - a broken pipeline elsewhere must not hide the message
        logger.debug("registry not loadable whole (%s): producers from the run only", exc)
        return producers({"this run": pipeline})


class ValidateBeforeRunHooks:
    """Before the first node: every parameter key known and each block checked, the inputs that
    one node wrote loaded from one run, every input loadable, the run's entries locked."""

    def __init__(self) -> None:
        self._context: Any = None
        self._guard: RunGuard | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        """Keep the context: the parameter files are read from its config loader."""
        global _nodes_started
        self._context = context
        _nodes_started = False

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        """The checks, in order; any failure stops the run before a node starts."""
        try:
            self._check_parameters(run_params, pipeline, catalog)
            made_by = _producers(pipeline, run_params)
            pinned = dict(run_params.get("load_versions") or {})
            notes, mixed = align_groups(pipeline, catalog, pinned, made_by)
            for note in notes:
                logger.info(note)
            check_inputs(pipeline, catalog, made_by, pinned, self._sources)
            for warning in mixed:
                logger.warning(warning)
            _log_inputs(pipeline, catalog, run_params.get("run_id"))
        except EXPECTED as exc:
            expected(exc)
            raise
        self._guard = RunGuard(str(run_params.get("run_id")))
        self._guard.start(pipeline, catalog)

    def _check_parameters(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        parameters = _parameters(catalog)
        known = file_parameters(self._context.config_loader) if self._context is not None else parameters
        check_top_level(parameters, known)
        runtime = run_params.get("runtime_params") or {}
        read = parameter_blocks(pipeline)
        for block in sorted(read | set(runtime)):
            validator = _resolve(VALIDATORS[block]) if block in VALIDATORS else None
            if validator is None or block not in parameters:
                continue
            validator(parameters[block])
            logger.info("parameters '%s' checked", block)
        unused = [p for p in runtime_paths(runtime) if p.split(".")[0] not in read]
        if unused:
            logger.warning("--params %s: no node of this run reads these parameters",
                           ", ".join(unused))
        # The resolution contract (issue 13): no stage upscales what the one before it wrote.
        from aim_kedro.resolution import check_resolution

        check_resolution(parameters, read)
        for node_name in sorted({n.name for n in pipeline.nodes} & set(PREFLIGHT)):
            block, path = PREFLIGHT[node_name]
            check = _resolve(path)
            if check is not None and block in parameters:
                check(parameters[block])

    def _sources(self, name: str) -> list[str]:
        loader = getattr(self._context, "config_loader", None)
        if loader is None:
            return []
        envs = [loader.base_env, loader.env or loader.default_run_env]
        return catalog_sources(loader.conf_source, [e for e in envs if e], name)

    @hook_impl
    def before_node_run(self) -> None:
        """From here on, errors are the nodes' own."""
        global _nodes_started
        _nodes_started = True

    @hook_impl
    def after_pipeline_run(self) -> None:
        """Release the run's locks."""
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        """Release the run's locks."""
        self._release()

    def _release(self) -> None:
        if self._guard is not None:
            self._guard.release()
            self._guard = None


def _parameters(catalog: Any) -> dict[str, Any]:
    """The run's parameters (read from the dataset: no "Loading data" line in the log)."""
    return catalog.get("parameters").load() if "parameters" in catalog else {}


def _log_inputs(pipeline: Pipeline, catalog: Any, version: str | None) -> None:
    """One line at the start of a run: its version and the versions of the entries it reads."""
    read = []
    for name in sorted(pipeline.inputs()):
        dataset = dataset_of(catalog, name)
        if not name.startswith("params:") and is_versioned(dataset):
            read.append(f"{name}@{load_version(dataset)}")
    logger.info("run %s reads %s", version, ", ".join(read) or "no versioned entry")


class RunManifestHooks:
    """Record what the run loads and saves (with versions) and save it as ``run_manifest`` at
    the end (``status`` completed or failed), with a one-line summary in the log."""

    def __init__(self) -> None:
        self._record: RunRecord | None = None
        self._catalog: Any = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        """Start a record for this run."""
        parameters = _parameters(catalog)
        blocks = {b: parameters[b] for b in sorted(parameter_blocks(pipeline)) if b in parameters}
        free = {n for n in pipeline.inputs() if not n.startswith("params:")}
        self._catalog = catalog
        self._record = RunRecord(version=str(run_params.get("run_id")), run_params=dict(run_params),
                                 parameters=blocks, free_inputs=free)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str) -> None:
        """An input was read: note its version."""
        if self._record is not None:
            self._record.loaded(dataset_name, dataset_of(self._catalog, dataset_name))

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        """An output was written: note its version."""
        if self._record is not None:
            self._record.saved(dataset_name, dataset_of(self._catalog, dataset_name))

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        """A node finished."""
        if self._record is not None:
            self._record.ran(node.name)

    @hook_impl
    def after_pipeline_run(self) -> None:
        """Save the manifest of a completed run."""
        self._finish("completed")

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        """Save the manifest of a failed run (what it wrote before it failed)."""
        self._finish("failed", error)

    def _finish(self, status: str, error: Exception | None = None) -> None:
        record, catalog = self._record, self._catalog
        self._record = None
        if record is None:
            return
        where = None
        if MANIFEST in catalog:
            try:
                with warnings.catch_warnings():
                    # A run that started later and ended first already saved a newer manifest:
                    # Kedro's "save version did not match load version" says only that, and
                    # nothing loads the manifest after this save.
                    warnings.filterwarnings("ignore", category=UserWarning,
                                            message="Save version .* did not match load version")
                    catalog.save(MANIFEST, record.payload(status, error))
                dataset = dataset_of(catalog, MANIFEST)
                where = str(Path(filepath_of(dataset)) / record.version / Path(filepath_of(dataset)).name) \
                    if is_versioned(dataset) else filepath_of(dataset)
            except Exception as exc:  # noqa: BLE001 - never hide the run's own result or error
                logger.error("could not save the run manifest: %s", exc)
        for line in record.summary(where):
            (logger.info if status == "completed" else logger.warning)(
                "%s%s", "" if status == "completed" else "failed ", line)
