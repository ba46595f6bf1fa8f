"""Project pipelines: every package under ``aim_kedro.pipelines`` is a pipeline of that name.

``kedro run --pipelines NAME`` imports only the package ``aim_kedro.pipelines.NAME`` (Kedro's
``find_pipelines`` loads the requested ones), so every registered name has a package of its own:
``evaluation_ml_aim`` (the evaluation probes on a published AIM v1 checkpoint) too.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

DEFAULT_ORDER = ("sample", "curation", "pretraining", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register each pipeline by its folder name; ``__default__`` runs the four of ``make run``
    in data order.

    ``evaluation_ml_aim`` probes a published AIM v1 checkpoint (the ``ml_aim_checkpoint`` entry)
    without needing a local pre-training run. ``scaling`` (a grid of pre-training runs) is
    registered but left out of ``__default__``: ``kedro run --pipelines scaling`` runs it.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (pipelines[name] for name in DEFAULT_ORDER if name in pipelines), Pipeline([])
    )
    return pipelines
