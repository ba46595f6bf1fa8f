"""The funnel, the metrics against the sample's truth, and the plots."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure
from PIL import Image

from aim_kedro.curation.report import (
    STAGES,
    box_recall,
    funnel,
    plot_funnel,
    plot_score_histogram,
    plot_thumbnails,
    truth_metrics,
)

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


def _png(fig: Figure) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_plots_are_figures_that_render() -> None:
    assert _png(plot_funnel(funnel(MANIFEST))).size[0] > 100
    scores = np.random.default_rng(0).normal(0.5, 0.2, 200)
    hist = plot_score_histogram(scores, 0.6, {"kept": scores[:100], "cut": scores[100:]})
    assert any(line.get_xdata()[0] == 0.6 for line in hist.axes[0].lines)
    assert _png(hist).size[0] > 100
    thumb = Image.new("RGB", (16, 16), (255, 0, 0))
    grid = plot_thumbnails([(thumb, "0.9")] * 3, [(thumb, "duplicate")] * 9, columns=4)
    assert len(grid.axes) == (1 + 3) * 4
    assert _png(grid).size[1] > 100
