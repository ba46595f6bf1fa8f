"""The ``sample`` pipeline: the embedded raw pool and probe sets, from images installed packages ship."""

from kedro.pipeline import Pipeline, node

from aim_kedro.pipelines.sample.nodes import build_probe_sets, build_raw_pool


def create_pipeline(**kwargs) -> Pipeline:
    """Probe sets first (the pool plants leaks of ``probe_test``), then pool, truth and trusted pairs."""
    return Pipeline(
        [
            node(
                build_probe_sets,
                inputs="params:sample",
                outputs=["probe_train", "probe_test"],
                name="build_probe_sets",
                tags=["sample"],
            ),
            node(
                build_raw_pool,
                inputs=["probe_test", "params:sample"],
                outputs=["raw_pool", "sample_truth", "trusted_pairs"],
                name="build_raw_pool",
                tags=["sample"],
            ),
        ]
    )
