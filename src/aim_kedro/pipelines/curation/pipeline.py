"""The ``curation`` pipeline: a raw image-text pool in, a DFN-style curated subset out.

Node names are stable, for ``kedro run --pipeline curation --from-nodes <name>``:
build_pool_index, train_filter_network, score_pool, apply_filters, deduplicate,
build_pool_manifest, export_dfn_uids, detect_faces, write_dfn_subset, check_dfn_subset,
report_curation, plot_curation. Each node takes only the ``params:curation.<block>`` entries it uses.
"""

from kedro.pipeline import Pipeline, node

from aim_kedro.pipelines.curation.nodes import (
    apply_filters,
    build_pool_index,
    build_pool_manifest,
    check_dfn_subset,
    deduplicate_pool,
    detect_faces_node,
    export_dfn_uids,
    plot_curation,
    report_curation,
    score_pool,
    train_filter_network_node,
    write_dfn_subset,
)


def _p(*blocks: str) -> list[str]:
    """``params:curation.<block>`` input names."""
    return [f"params:curation.{block}" for block in blocks]


RUN_ON = ("executor", "progress")  # where the per-shard stages run, and their progress bars


def create_pipeline(**kwargs) -> Pipeline:
    """Index -> (filter network) -> scores -> filters -> dedup -> manifest -> faces -> subset
    -> check -> report and plots; per-shard steps stream, only the cut and dedup see all rows."""
    return Pipeline(
        [
            node(
                build_pool_index,
                inputs=["raw_pool", *_p("index", *RUN_ON)],
                outputs=["pool_index", "curation_index_stats"],
                name="build_pool_index",
            ),
            node(
                train_filter_network_node,
                inputs=["trusted_pairs", *_p("filter_network", "scoring")],
                outputs="filter_network",
                name="train_filter_network",
            ),
            node(
                score_pool,
                inputs=[
                    "raw_pool", "pool_index", "filter_network", "clip_score_cache",
                    *_p("scoring", "filters.nsfw_threshold", "index", *RUN_ON),
                ],
                outputs=["clip_scores", "clip_embeddings", "curation_scoring_stats"],
                name="score_pool",
            ),
            node(
                apply_filters,
                inputs=["pool_index", "clip_scores", *_p("filters")],
                outputs=["filter_decisions", "curation_filter_stats"],
                name="apply_filters",
            ),
            node(
                deduplicate_pool,
                inputs=[
                    "pool_index", "clip_scores", "clip_embeddings", "filter_decisions",
                    "probe_test", "filter_network", *_p("dedup", "index", "scoring"),
                ],
                outputs=["dedup_decisions", "curation_dedup_stats"],
                name="deduplicate",
            ),
            node(
                build_pool_manifest,
                inputs=[
                    "pool_index", "clip_scores", "filter_decisions", "dedup_decisions",
                    *_p("filters"),
                ],
                outputs=["pool_manifest", "curation_selection_stats"],
                name="build_pool_manifest",
            ),
            node(
                export_dfn_uids,
                inputs="pool_manifest",
                outputs="dfn_uids",
                name="export_dfn_uids",
            ),
            node(
                detect_faces_node,
                inputs=["raw_pool", "pool_manifest", *_p("faces", "index", *RUN_ON)],
                outputs=["face_boxes", "curation_face_stats"],
                name="detect_faces",
            ),
            node(
                write_dfn_subset,
                inputs=[
                    "raw_pool", "pool_manifest", "pool_index", "clip_scores", "face_boxes",
                    *_p("subset", "index", *RUN_ON),
                ],
                outputs=["dfn_subset", "dfn_manifest"],
                name="write_dfn_subset",
            ),
            node(
                check_dfn_subset,
                inputs=["dfn_subset", "dfn_manifest", *_p("subset")],
                outputs="curation_subset_stats",
                name="check_dfn_subset",
            ),
            node(
                report_curation,
                inputs={
                    "pool_manifest": "pool_manifest",
                    "face_boxes": "face_boxes",
                    "sample_truth": "sample_truth",
                    "filter_network": "filter_network",
                    "report": "params:curation.report",
                    # the stage summaries, by node name
                    "build_pool_index": "curation_index_stats",
                    "score_pool": "curation_scoring_stats",
                    "apply_filters": "curation_filter_stats",
                    "deduplicate": "curation_dedup_stats",
                    "build_pool_manifest": "curation_selection_stats",
                    "detect_faces": "curation_face_stats",
                    "check_dfn_subset": "curation_subset_stats",
                },
                outputs="curation_report",
                name="report_curation",
            ),
            node(
                plot_curation,
                inputs=["pool_manifest", "curation_report", "raw_pool", *_p("report", "index")],
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
