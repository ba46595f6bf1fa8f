"""The ``curation`` pipeline: raw pool -> index -> scores -> filters -> dedup -> faces -> subset."""

from aim_kedro.pipelines.curation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
