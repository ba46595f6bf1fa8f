"""The ``pretraining`` pipeline: check parameters, pre-train, plot the loss curve."""

from kedro.pipeline import Pipeline, node

from aim_kedro.pipelines.pretraining.nodes import (
    plot_loss_curve,
    pretrain_aim,
    validate_pretraining_params,
)

TAG = "pretraining"


def create_pipeline(**kwargs) -> Pipeline:
    """``dfn_subset`` (+ ``secondary_pool``, in the run directory ``pretraining_run``) ->
    ``aim_checkpoint``, ``aim_intermediate_checkpoints``, ``training_history`` -> ``loss_curve``;
    the parameter check runs first and does no work."""
    return Pipeline(
        [
            node(
                validate_pretraining_params,
                inputs="params:pretraining",
                outputs="pretraining_settings",
                name="validate_pretraining_params",
            ),
            node(
                pretrain_aim,
                inputs=["dfn_subset", "secondary_pool", "pretraining_run", "pretraining_settings"],
                outputs=["aim_checkpoint", "aim_intermediate_checkpoints", "training_history"],
                name="pretrain_aim",
            ),
            node(
                plot_loss_curve,
                inputs="training_history",
                outputs="loss_curve",
                name="plot_loss_curve",
            ),
        ],
        tags=[TAG],
    )
