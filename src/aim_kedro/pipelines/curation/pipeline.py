"""The ``curation`` pipeline: a raw image-text pool in, a DFN-style curated subset out.

Node names are stable, for ``kedro run --pipeline curation --from-nodes <name>``:
build_pool_index, train_filter_network, score_pool, apply_filters, deduplicate,
build_pool_manifest, detect_faces, write_dfn_subset, report_curation, plot_curation.
"""

from kedro.pipeline import Pipeline, node

from aim_kedro.pipelines.curation.nodes import (
    apply_filters,
    build_pool_index,
    build_pool_manifest,
    deduplicate_pool,
    detect_faces_node,
    plot_curation,
    report_curation,
    score_pool,
    train_filter_network_node,
    write_dfn_subset,
)

PARAMS = "params:curation"


def create_pipeline(**kwargs) -> Pipeline:
    """Index -> (filter network) -> scores -> filters -> dedup -> manifest -> faces -> subset
    -> report and plots; per-shard steps stream, only the cut and dedup see all rows."""
    return Pipeline(
        [
            node(
                build_pool_index,
                inputs=["raw_pool", PARAMS],
                outputs=["pool_index", "curation_index_stats"],
                name="build_pool_index",
            ),
            node(
                train_filter_network_node,
                inputs=["trusted_pairs", PARAMS],
                outputs="filter_network",
                name="train_filter_network",
            ),
            node(
                score_pool,
                inputs=["raw_pool", "pool_index", "filter_network", "clip_score_cache", PARAMS],
                outputs=["clip_scores", "clip_embeddings", "curation_scoring_stats"],
                name="score_pool",
            ),
            node(
                apply_filters,
                inputs=["pool_index", "clip_scores", PARAMS],
                outputs=["filter_decisions", "curation_filter_stats"],
                name="apply_filters",
            ),
            node(
                deduplicate_pool,
                inputs=[
                    "pool_index",
                    "clip_scores",
                    "clip_embeddings",
                    "filter_decisions",
                    "probe_test",
                    "filter_network",
                    PARAMS,
                ],
                outputs=["dedup_decisions", "curation_dedup_stats"],
                name="deduplicate",
            ),
            node(
                build_pool_manifest,
                inputs=["pool_index", "clip_scores", "filter_decisions", "dedup_decisions", PARAMS],
                outputs=["pool_manifest", "curation_selection_stats"],
                name="build_pool_manifest",
            ),
            node(
                detect_faces_node,
                inputs=["raw_pool", "pool_manifest", PARAMS],
                outputs=["face_boxes", "curation_face_stats"],
                name="detect_faces",
            ),
            node(
                write_dfn_subset,
                inputs=["raw_pool", "pool_manifest", "pool_index", "clip_scores", "face_boxes", PARAMS],
                # dfn_subset first: it is saved (the stream consumed) before its stats are.
                outputs=["dfn_subset", "dfn_manifest", "curation_subset_stats"],
                name="write_dfn_subset",
            ),
            node(
                report_curation,
                inputs=[
                    "pool_manifest",
                    "face_boxes",
                    "dfn_manifest",
                    "sample_truth",
                    "filter_network",
                    "curation_index_stats",
                    "curation_scoring_stats",
                    "curation_filter_stats",
                    "curation_dedup_stats",
                    "curation_selection_stats",
                    "curation_face_stats",
                    "curation_subset_stats",
                    PARAMS,
                ],
                outputs="curation_report",
                name="report_curation",
            ),
            node(
                plot_curation,
                inputs=["pool_manifest", "curation_report", "raw_pool", PARAMS],
                outputs=[
                    "curation_funnel_plot",
                    "curation_score_histogram",
                    "curation_thumbnails",
                ],
                name="plot_curation",
            ),
        ],
        tags=["curation"],
    )
