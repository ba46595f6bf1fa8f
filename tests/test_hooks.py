"""The run hook finds which parameter blocks a pipeline reads."""

from kedro.pipeline import Pipeline, node

from aim_kedro.hooks import parameter_blocks


def _f(*args):
    return 1


def test_parameter_blocks_reads_nested_params() -> None:
    pipe = Pipeline([
        node(_f, ["a", "params:curation.filters"], "b", name="n1"),
        node(_f, ["b", "params:pretraining"], "c", name="n2"),
    ])
    assert parameter_blocks(pipe) == {"curation", "pretraining"}
