"""Project pipelines: every pipeline under ``aim_kedro.pipelines`` is found by ``find_pipelines``."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from aim_kedro.pipelines import evaluation

DEFAULT_ORDER = ("sample", "curation", "pretraining", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register each pipeline by its folder name; ``__default__`` runs them all, in data order.

    ``evaluation_ml_aim`` probes a published AIM v1 checkpoint (the ``ml_aim_checkpoint`` entry)
    without needing a local pre-training run. ``scaling`` (a grid of pre-training runs) is
    registered but left out of ``__default__``: ``kedro run --pipeline scaling`` runs it.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["evaluation_ml_aim"] = evaluation.create_pipeline(trunk_source="ml_aim")
    pipelines["__default__"] = sum(
        (pipelines[name] for name in DEFAULT_ORDER if name in pipelines), Pipeline([])
    )
    return pipelines
