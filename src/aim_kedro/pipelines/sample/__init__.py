"""Builds the embedded sample pool (raw_pool, sample_truth, trusted_pairs, probe sets)."""

from aim_kedro.pipelines.sample.pipeline import create_pipeline

__all__ = ["create_pipeline"]
