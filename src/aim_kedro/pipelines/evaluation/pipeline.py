"""The ``evaluation`` pipeline: probe a frozen trunk against a random-init baseline, and relate the
pre-training validation loss of intermediate checkpoints to probe accuracy."""

from kedro.pipeline import Pipeline, node

from aim_kedro.pipelines.evaluation.nodes import (
    extract_probe_features,
    extract_random_init_features,
    load_eval_sets,
    load_trunk,
    loss_vs_accuracy,
    plot_loss_vs_accuracy,
    plot_probe_results,
    train_probes,
    validate_evaluation_params,
)

TAG = "evaluation"


def create_pipeline(**kwargs) -> Pipeline:
    """All evaluation nodes; tags ``probes`` and ``loss_vs_accuracy`` select either half.

    ``create_pipeline(trunk_source="ml_aim")`` builds the probe half without the ``aim_checkpoint``
    input (and without loss vs accuracy), to probe a published AIM v1 checkpoint on a machine
    that has no pre-training run.
    """
    published_only = kwargs.get("trunk_source", "catalog") == "ml_aim"
    trunk_inputs = (
        ["evaluation_settings"] if published_only else ["evaluation_settings", "aim_checkpoint"]
    )
    shared = Pipeline(
        [
            node(
                validate_evaluation_params,
                inputs="params:evaluation",
                outputs="evaluation_settings",
                name="validate_evaluation_params",
            ),
            node(
                load_eval_sets,
                inputs=["probe_train", "probe_test", "evaluation_settings"],
                outputs="eval_sets",
                name="load_eval_sets",
            ),
        ],
        tags=[TAG, "probes", "loss_vs_accuracy"],
    )
    probes = Pipeline(
        [
            node(load_trunk, inputs=trunk_inputs, outputs="eval_trunk", name="load_trunk"),
            node(
                extract_probe_features,
                inputs=["eval_trunk", "eval_sets", "evaluation_settings"],
                outputs="probe_features",
                name="extract_probe_features",
            ),
            node(
                extract_random_init_features,
                inputs=["eval_trunk", "eval_sets", "evaluation_settings"],
                outputs="random_init_features",
                name="extract_random_init_features",
            ),
            node(
                train_probes,
                inputs=["probe_features", "random_init_features", "evaluation_settings"],
                outputs="probe_metrics",
                name="train_probes",
            ),
            node(
                plot_probe_results,
                inputs="probe_metrics",
                outputs="probe_results_plot",
                name="plot_probe_results",
            ),
        ],
        tags=[TAG, "probes"],
    )
    if published_only:
        return shared + probes
    curve = Pipeline(
        [
            node(
                loss_vs_accuracy,
                inputs=[
                    "aim_intermediate_checkpoints",
                    "training_history",
                    "eval_sets",
                    "evaluation_settings",
                ],
                outputs=["loss_vs_accuracy", "loss_vs_accuracy_summary"],
                name="compute_loss_vs_accuracy",
            ),
            node(
                plot_loss_vs_accuracy,
                inputs=["loss_vs_accuracy", "loss_vs_accuracy_summary"],
                outputs="loss_vs_accuracy_plot",
                name="plot_loss_vs_accuracy",
            ),
        ],
        tags=[TAG, "loss_vs_accuracy"],
    )
    return shared + probes + curve
