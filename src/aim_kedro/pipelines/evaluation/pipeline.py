"""The ``evaluation`` pipeline: probe a frozen trunk against a random-init baseline, and relate the
pre-training validation loss of intermediate checkpoints to probe accuracy."""

from kedro.pipeline import Pipeline, node

from aim_kedro.pipelines.evaluation.nodes import (
    ML_AIM_BLOCKS,
    STUDY_BLOCKS,
    extract_probe_features,
    extract_random_init_features,
    load_eval_sets,
    load_ml_aim_trunk,
    load_trunk,
    loss_vs_accuracy,
    plot_loss_vs_accuracy,
    plot_probe_results,
    train_probes,
    validate_evaluation_params,
    validate_ml_aim_evaluation_params,
)

TAG = "evaluation"


def config_name(block: str) -> str:
    """The in-memory dataset that hands the typed ``evaluation.<block>`` on (``eval_device``)."""
    return "eval_device" if block == "device" else f"eval_{block}_config"


def create_pipeline(**kwargs) -> Pipeline:
    """All evaluation nodes; tags ``probes`` and ``loss_vs_accuracy`` select either half.

    ``create_pipeline(trunk_source="ml_aim")`` builds the probe half on the catalog entry
    ``ml_aim_checkpoint`` (a published AIM v1 checkpoint, with ``evaluation.trunk.config``)
    instead of ``aim_checkpoint``, without loss vs accuracy: it needs no pre-training run.
    """
    published_only = kwargs.get("trunk_source", "catalog") == "ml_aim"
    blocks = ML_AIM_BLOCKS if published_only else STUDY_BLOCKS
    validate = validate_ml_aim_evaluation_params if published_only else validate_evaluation_params
    trunk = (
        node(load_ml_aim_trunk, inputs=["ml_aim_checkpoint", config_name("trunk")],
             outputs="eval_trunk", name="load_trunk")
        if published_only
        else node(load_trunk, inputs="aim_checkpoint", outputs="eval_trunk", name="load_trunk")
    )
    device, features = config_name("device"), config_name("features")
    shared = Pipeline(
        [
            node(
                validate,
                inputs="params:evaluation",
                outputs={block: config_name(block) for block in blocks},
                name="validate_evaluation_params",
            ),
            node(
                load_eval_sets,
                inputs=["probe_train", "probe_test", config_name("dataset")],
                outputs="eval_sets",
                name="load_eval_sets",
            ),
        ],
        tags=[TAG, "probes", "loss_vs_accuracy"],
    )
    probes = Pipeline(
        [
            trunk,
            node(
                extract_probe_features,
                inputs=["eval_trunk", "eval_sets", features, device],
                outputs="probe_features",
                name="extract_probe_features",
            ),
            node(
                extract_random_init_features,
                inputs=["eval_trunk", "eval_sets", features, config_name("random_init"), device],
                outputs="random_init_features",
                name="extract_random_init_features",
            ),
            node(
                train_probes,
                inputs=["probe_features", "random_init_features", config_name("probes"), device,
                        config_name("recipe"), config_name("aim_paper"), "eval_trunk", "eval_sets",
                        config_name("random_init")],
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
                    config_name("loss_vs_accuracy"),
                    features,
                    config_name("probes"),
                    device,
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
