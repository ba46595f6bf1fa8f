"""The ``scaling`` pipeline: the paper's first finding (features scale with capacity and data)."""

from aim_kedro.pipelines.scaling.pipeline import create_pipeline

__all__ = ["create_pipeline"]
