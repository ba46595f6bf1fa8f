"""Project pipelines: every pipeline under ``aim_kedro.pipelines`` is found by ``find_pipelines``."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

DEFAULT_ORDER = ("sample", "curation", "pretraining", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register each pipeline by its folder name; ``__default__`` runs them all, in data order."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (pipelines[name] for name in DEFAULT_ORDER if name in pipelines), Pipeline([])
    )
    return pipelines
