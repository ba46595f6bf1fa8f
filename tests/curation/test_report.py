"""The funnel, the metrics against the sample's truth, and the report of the stage summaries."""

from __future__ import annotations

import polars as pl
import pytest

from aim_kedro.curation.report import STAGES, box_recall, build_report, funnel, truth_metrics

MANIFEST = pl.DataFrame(
    {
        "uid": ["c1", "c2", "c3", "w1", "w2", "d1", "n1", "n2", "l1", "x1", "x2", "f1", "c4"],
        "clip_score": [0.9, 0.8, 0.7, 0.2, 0.75, 0.9, 0.6, 0.8, 0.9, None, None, 0.85, 0.5],
        "kept": [True, False, True, False, True, False, True, False, False, False, False, True,
                 False],
        "reject_reason": [None, "duplicate", None, "low_clip_score", None, "duplicate", None,
                          "duplicate", "eval_leak", "corrupt", "no_caption", None, "duplicate"],
        "dedup_cluster": [0, 0, None, None, None, 0, None, 0, None, None, None, None, 3],
    },
    schema_overrides={"dedup_cluster": pl.Int64},
)
TRUTH = pl.DataFrame(
    {
        "uid": ["c1", "c2", "c3", "w1", "w2", "d1", "n1", "n2", "l1", "x1", "x2", "f1", "c4",
                "gone"],
        "kind": ["clean", "clean", "clean", "wrong_caption", "wrong_caption", "exact_duplicate",
                 "near_duplicate", "near_duplicate", "eval_leak", "corrupt", "corrupt", "face",
                 "clean", "clean"],
        "variant": [None, None, None, None, None, "byte_copy", "cropped", "jpeg", "exact",
                    "zero_byte", "no_caption", "lfw", None, None],
        "source_uid": [None, None, None, None, None, "c1", "c3", "c2", None, None, None, None,
                       None, None],
        "eval_id": [None] * 8 + ["digits-0001"] + [None] * 5,
        "face_boxes": [[]] * 11 + [[[10, 10, 30, 30]]] + [[]] * 2,
    },
    schema_overrides={"face_boxes": pl.List(pl.List(pl.Int64))},
)
FACES = pl.DataFrame(
    {"uid": ["c1", "c3", "w2", "n1", "f1"], "boxes": [[], [], [[0, 0, 5, 5]], [], [[9, 11, 31, 29]]],
     "face_count": [0, 0, 1, 0, 1]},
    schema_overrides={"boxes": pl.List(pl.List(pl.Int32))},
)


def test_funnel_follows_the_decision_order_and_adds_up() -> None:
    flow = funnel(MANIFEST)
    assert flow["input"] == 13 and flow["kept"] == 5 and flow["rejected"] == 8
    assert [s["stage"] for s in flow["stages"]] == list(STAGES)
    assert flow["by_reason"]["duplicate"] == 4 and flow["stages"][-1]["remaining"] == 5
    bad = MANIFEST.with_columns(pl.lit("mystery").alias("reject_reason"))
    with pytest.raises(ValueError, match="unknown reject reasons"):
        funnel(bad)


def test_truth_metrics_measure_each_stage() -> None:
    m = truth_metrics(MANIFEST, TRUTH, FACES)
    assert m["truth_rows_not_in_pool"] == 1
    # clean scores 0.9 0.8 0.7 0.5 vs wrong 0.2 0.75: 6 of 8 pairs ordered right
    assert m["wrong_caption"]["roc_auc_clip_score_vs_clean"] == pytest.approx(6 / 8)
    assert m["wrong_caption"]["removed_by_score_cut"] == 1
    exact = m["exact_duplicate"]
    assert exact["detection_recall"] == 1.0 and exact["removed_fraction"] == 1.0
    near = m["near_duplicate"]
    assert near["detected"] == 1 and near["detection_recall"] == 0.5
    assert near["removed"] == 1  # n1 was missed: it and its source c3 are both kept
    assert near["detection_recall_by_variant"] == {"cropped": 0.0, "jpeg": 1.0}
    dup = m["duplicate_stage"]
    # c2 shares its cluster with its copy n2 (a right call); c4 has no copy: removed wrongly
    assert dup["rejected"] == 4 and dup["clean_removed_as_duplicate"] == 1
    assert dup["precision"] == 0.75
    assert m["eval_leak"]["removed_fraction"] == 1.0 and m["eval_leak"]["precision"] == 1.0
    assert m["corrupt"]["recall"] == 1.0 and m["corrupt"]["rejected_with_expected_reason"] == 2
    face = m["face"]
    assert face["kept"] == 1 and face["box_recall"] == 1.0
    assert face["non_face_images_with_a_detection"] == 1


def test_box_recall_counts_overlap_or_containment() -> None:
    assert box_recall([[10, 10, 30, 30]], [[12, 12, 28, 28]], 0.9) == 1
    assert box_recall([[10, 10, 30, 30]], [[40, 40, 50, 50]], 0.3) == 0
    assert box_recall([[10, 10, 30, 30], [0, 0, 4, 4]], [[0, 0, 4, 5]], 0.3) == 1


def test_report_gathers_the_stage_summaries() -> None:
    stats = {
        "build_pool_index": {"samples": 13, "seconds": 1.0},
        "score_pool": {"model": "tiny", "seconds": 2.0},
        "deduplicate": {"clusters": 2, "seconds": 0.5},
        "build_pool_manifest": {"threshold": 0.7, "threshold_rule": "keep_fraction",
                                "keep_fraction": 0.5, "score_cut_candidates": 8, "seconds": 0.1},
        "detect_faces": {"images": 5, "seconds": 0.2},
        "check_dfn_subset": {"kept": 5, "written": 5, "seconds": 0.3},
    }
    report = build_report(MANIFEST, stats, {"seconds": 9.0, "steps": 3}, TRUTH, FACES)
    assert report["funnel"]["kept"] == 5 and report["truth"]["truth_rows_not_in_pool"] == 1
    assert report["score_cut"] == {"threshold": 0.7, "rule": "keep_fraction",
                                   "keep_fraction": 0.5, "candidates": 8, "scoring_model": "tiny"}
    assert list(report["seconds"]) == ["build_pool_index", "train_filter_network", "score_pool",
                                       "deduplicate", "build_pool_manifest", "detect_faces",
                                       "check_dfn_subset"]
    assert report["seconds"]["train_filter_network"] == 9.0
    assert report["subset"] == {"kept": 5, "written": 5} and report["dedup"] == {"clusters": 2}
    assert build_report(MANIFEST, stats)["truth"] is None
    with pytest.raises(AssertionError, match="dfn_manifest has 4 rows"):
        build_report(MANIFEST, {**stats, "check_dfn_subset": {"kept": 4}})
