"""Opt-in experiment tracking: kedro-mlflow's hook, active only for the pipelines mlflow.yml tracks.

kedro-mlflow registers its hook for every session as soon as it is installed, and that hook sets
up a tracking store (an ``mlruns`` folder, or a refusal from MLflow 3 to use one) before it knows
which pipeline runs. ``settings.py`` switches the plugin's own registration off and registers
``MlflowTracking`` instead: it reads ``mlflow.yml`` (kedro-mlflow's format) and does nothing, not
even ``import mlflow``, unless some pipeline of the run is missing from
``tracking.disable_tracking.pipelines``. conf/base/mlflow.yml lists every pipeline, so a plain
``kedro run`` tracks nothing; conf/local/mlflow.yml (or ``--env``) turns tracking on.

When a run is tracked, kedro-mlflow logs the ``params:`` inputs of every node, and this hook
adds the numbers of the node outputs named in ``METRIC_OUTPUTS`` as MLflow metrics, plus each
node's wall time.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)

# Node outputs whose numbers become metrics: dicts give their numeric leaves under dotted keys
# (``probe_metrics.pretrained.attentive.top1``); tables with a ``step`` column give one point per
# row and numeric column (``training_history.train_loss`` at step 250).
METRIC_OUTPUTS: tuple[str, ...] = (
    "curation_report",
    "training_history",
    "probe_metrics",
    "loss_vs_accuracy",
    "loss_vs_accuracy_summary",
)
CONFIG_PATTERNS = ["mlflow*", "mlflow*/**", "**/mlflow*"]  # the patterns kedro-mlflow reads
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")


def read_mlflow_config(context: Any) -> dict[str, Any] | None:
    """The run environment's ``mlflow.yml`` (base merged with the env), or None when there is none."""
    loader = context.config_loader
    if "mlflow" not in loader.config_patterns:
        loader.config_patterns.update({"mlflow": CONFIG_PATTERNS})
    try:
        return dict(loader["mlflow"] or {})
    except MissingConfigException:
        return None


def tracked_pipelines(run_params: dict[str, Any]) -> list[str]:
    """The pipeline names of a run as kedro-mlflow sees them (``__default__`` when none is named)."""
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    return [names] if isinstance(names, str) else list(names)


def is_tracked(pipeline_names: Iterable[str], config: dict[str, Any] | None) -> bool:
    """kedro-mlflow's rule: a run is tracked unless all its pipelines are in the disabled list."""
    if config is None:
        return False
    disabled = set(
        ((config.get("tracking") or {}).get("disable_tracking") or {}).get("pipelines") or []
    )
    return not all(name in disabled for name in pipeline_names)


def _is_local_store(uri: str | None) -> bool:
    return uri is None or "://" not in uri or uri.startswith("file:")


def metric_key(*parts: str) -> str:
    """A dotted MLflow metric name with the characters MLflow refuses replaced by ``_``."""
    return _BAD_KEY_CHARS.sub("_", ".".join(parts))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_points(name: str, value: Any) -> Iterator[tuple[str, float, int]]:
    """``(key, value, step)`` for the numbers of one output: dict leaves, or step-indexed rows."""
    if isinstance(value, dict):
        yield from _dict_points((name,), value)
        return
    columns = getattr(value, "columns", None)
    if columns is None or "step" not in columns or not hasattr(value, "iter_rows"):
        return
    for row in value.iter_rows(named=True):
        step = _number(row["step"])
        if step is None:
            continue
        for column, cell in row.items():
            number = _number(cell)
            if column != "step" and number is not None:
                yield metric_key(name, str(column)), number, int(step)


def _dict_points(prefix: tuple[str, ...], value: dict[Any, Any]) -> Iterator[tuple[str, float, int]]:
    for key, item in value.items():
        if isinstance(item, dict):
            yield from _dict_points((*prefix, str(key)), item)
        elif (number := _number(item)) is not None:
            yield metric_key(*prefix, str(key)), number, 0


KEDRO_MLFLOW_HOOK = "mlflow_hook"
"""The name of kedro-mlflow's ``kedro.hooks`` entry point."""


class MlflowTracking:
    """kedro-mlflow's ``MlflowHook`` for tracked runs only, plus metrics from node outputs.

    It registers under the name of kedro-mlflow's hook entry point, so pluggy skips loading that
    entry point (a plugin of that name is already registered) and a session does not import
    mlflow (about 1.7 s) until a tracked run needs it."""

    def __init__(self, metric_outputs: Iterable[str] = METRIC_OUTPUTS) -> None:
        self.__name__ = KEDRO_MLFLOW_HOOK  # pluggy's canonical name of this plugin
        self.metric_outputs = set(metric_outputs)
        self._context: Any = None
        self._hook: Any = None  # kedro-mlflow's MlflowHook while a tracked run is open
        self._started: dict[str, float] = {}

    @property
    def active(self) -> bool:
        """Whether the current run is being tracked."""
        return self._hook is not None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        """Keep the context: whether to track is known only once the pipeline is."""
        self._context = context
        self._hook = None

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Open an MLflow run when mlflow.yml tracks one of the run's pipelines (after the checks)."""
        self._hook = None
        names = tracked_pipelines(run_params)
        config = read_mlflow_config(self._context) if self._context is not None else None
        if not is_tracked(names, config):
            logger.debug("experiment tracking off for pipelines %s", names)
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if _is_local_store((config.get("server") or {}).get("mlflow_tracking_uri")):
            # MLflow 3 refuses a file store unless told; a local folder is what we want here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"mlflow.yml tracks pipelines {names} but kedro-mlflow is not installed: "
                "`pip install -e '.[dev]'` (or kedro-mlflow), or list these pipelines under "
                "tracking.disable_tracking.pipelines."
            ) from exc
        hook = MlflowHook()
        hook.after_context_created(context=self._context)
        hook.before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        self._hook = hook
        logger.info("MLflow run %s tracks pipelines %s at %s", hook.run_id, names,
                    hook.mlflow_config.server.mlflow_tracking_uri)

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool) -> None:
        """Log the node's ``params:`` inputs (kedro-mlflow) and start its clock."""
        if self._hook is None:
            return
        self._hook.before_node_run(node=node, catalog=catalog, inputs=inputs, is_async=is_async)
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        """Log the node's wall time and the numbers of its outputs named in ``metric_outputs``."""
        if self._hook is None:
            return
        points = []
        if node.name in self._started:
            seconds = time.perf_counter() - self._started.pop(node.name)
            points.append((metric_key("node_seconds", node.name), seconds, 0))
        for name, value in outputs.items():
            if name in self.metric_outputs:
                points.extend(metric_points(name, value))
        self._log(points)

    def _log(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in points]
        for start in range(0, len(metrics), _MAX_BATCH):
            client.log_batch(self._hook.run_id, metrics=metrics[start : start + _MAX_BATCH])

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Close the MLflow run."""
        if self._hook is None:
            return
        self._hook.after_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        logger.info("MLflow run %s finished", self._hook.run_id)
        self._hook = None

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any,
                          catalog: Any) -> None:
        """Mark the MLflow run failed."""
        if self._hook is None:
            return
        self._hook.on_pipeline_error(error=error, run_params=run_params, pipeline=pipeline,
                                     catalog=catalog)
        self._hook = None
