"""The ``evaluation_ml_aim`` pipeline: the evaluation pipeline's probes on a published AIM v1
checkpoint (the catalog entry ``ml_aim_checkpoint``), without a local pre-training run.

A package of its own so that ``kedro run --pipelines evaluation_ml_aim`` finds it (Kedro loads
only the requested pipeline packages); its nodes are the evaluation pipeline's.
"""

from kedro.pipeline import Pipeline

from aim_kedro.pipelines import evaluation


def create_pipeline(**kwargs) -> Pipeline:
    """``evaluation.create_pipeline(trunk_source="ml_aim")``."""
    return evaluation.create_pipeline(trunk_source="ml_aim")


__all__ = ["create_pipeline"]
