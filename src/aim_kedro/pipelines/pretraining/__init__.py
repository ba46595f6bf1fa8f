"""The ``pretraining`` pipeline: pre-train an AIM on the curated subset (glue over aim_kedro.aim)."""

from aim_kedro.pipelines.pretraining.pipeline import create_pipeline

__all__ = ["create_pipeline"]
