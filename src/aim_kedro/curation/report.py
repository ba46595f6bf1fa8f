"""The curation report: the funnel, metrics of every stage against the sample's truth.

Metrics only need the pool manifest (one row per pool sample with its decision), the face table
and, when there is one, the truth table of the embedded sample. The figures are in ``plots``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from aim_kedro.curation.reasons import NSFW, STAGES

logger = logging.getLogger(__name__)


def funnel(manifest: pl.DataFrame) -> dict[str, Any]:
    """Counts per reject reason in decision order, and how many samples remain after each stage."""
    total = manifest.height
    counts = dict(manifest.group_by("reject_reason").len().drop_nulls("reject_reason").iter_rows())
    unknown = sorted(set(counts) - set(STAGES))
    if unknown:
        raise ValueError(f"pool manifest has unknown reject reasons {unknown}; known: {STAGES}")
    kept = int(manifest["kept"].sum())
    remaining = total
    stages = []
    for reason in STAGES:
        removed = int(counts.get(reason, 0))
        remaining -= removed
        stages.append({"stage": reason, "removed": removed, "remaining": remaining})
    if remaining != kept:
        raise AssertionError(f"funnel does not add up: {remaining} remain but {kept} are kept")
    return {
        "input": total,
        "kept": kept,
        "rejected": total - kept,
        "by_reason": {reason: int(counts.get(reason, 0)) for reason in STAGES},
        "stages": stages,
    }


def _fraction(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def _pair_metrics(joined: pl.DataFrame, kind: str) -> dict[str, Any]:
    """How the duplicates of one truth kind fared: same cluster as the source, content not kept
    twice, and the copy itself rejected, overall and per variant."""
    lookup = {
        uid: (kept, cluster)
        for uid, kept, cluster in joined.select("uid", "kept", "dedup_cluster").iter_rows()
    }
    rows = joined.filter(pl.col("kind") == kind)
    per_variant: dict[str, list[int]] = {}
    detected = resolved = dropped = pairs = 0
    for source, variant, kept, cluster in rows.select(
        "source_uid", "variant", "kept", "dedup_cluster"
    ).iter_rows():
        if source not in lookup:
            continue
        source_kept, source_cluster = lookup[source]
        pairs += 1
        same = cluster is not None and cluster == source_cluster
        detected += same
        resolved += not (kept and source_kept)
        dropped += not kept
        stats = per_variant.setdefault(str(variant), [0, 0])
        stats[0] += 1
        stats[1] += same
    return {
        "count": pairs,
        "detected": detected,
        "detection_recall": _fraction(detected, pairs),
        "removed": resolved,
        "removed_fraction": _fraction(resolved, pairs),
        "copy_rejected_fraction": _fraction(dropped, pairs),
        "detection_recall_by_variant": {
            v: _fraction(hit, n) for v, (n, hit) in sorted(per_variant.items())
        },
    }


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_recall(truth_boxes: Sequence[Sequence[float]], found: Sequence[Sequence[float]], iou: float) -> int:
    """How many truth boxes a found box overlaps with at least ``iou`` (or contains / is inside)."""
    hits = 0
    for t in truth_boxes:
        for f in found:
            inside = f[0] <= t[0] and f[1] <= t[1] and f[2] >= t[2] and f[3] >= t[3]
            covered = t[0] <= f[0] and t[1] <= f[1] and t[2] >= f[2] and t[3] >= f[3]
            if _iou(t, f) >= iou or inside or covered:
                hits += 1
                break
    return hits


def truth_metrics(
    manifest: pl.DataFrame,
    truth: pl.DataFrame,
    faces: pl.DataFrame | None = None,
    face_iou: float = 0.3,
) -> dict[str, Any]:
    """Precision and recall of every stage against the sample's truth table.

    ``manifest``: uid, clip_score, kept, reject_reason, dedup_cluster. ``truth``: uid, kind,
    variant, source_uid, eval_id, face_boxes. ``faces``: uid, boxes, face_count of the samples
    the detector ran on (the kept ones).
    """
    joined = manifest.join(
        truth.select("uid", "kind", "variant", "source_uid", "eval_id", "face_boxes"),
        on="uid",
        how="left",
    )
    out: dict[str, Any] = {
        "samples_with_truth": int(joined["kind"].is_not_null().sum()),
        "samples_without_truth": int(joined["kind"].is_null().sum()),
        "truth_rows_not_in_pool": int(truth.join(manifest.select("uid"), on="uid", how="anti").height),
    }
    kinds = dict(joined.group_by("kind").len().drop_nulls("kind").iter_rows())
    out["kinds"] = {k: int(v) for k, v in sorted(kinds.items())}

    scored = joined.filter(pl.col("clip_score").is_not_null() & pl.col("clip_score").is_not_nan())
    clean_scores = scored.filter(pl.col("kind") == "clean")["clip_score"].to_numpy()
    wrong_scores = scored.filter(pl.col("kind") == "wrong_caption")["clip_score"].to_numpy()
    auc = None
    if len(clean_scores) and len(wrong_scores):
        labels = np.r_[np.ones(len(clean_scores)), np.zeros(len(wrong_scores))]
        auc = round(float(roc_auc_score(labels, np.r_[clean_scores, wrong_scores])), 4)
    low = joined.filter(pl.col("reject_reason") == "low_clip_score")
    reached_cut = joined.filter(
        pl.col("kept") | (pl.col("reject_reason") == "low_clip_score")
    )
    wrong_at_cut = reached_cut.filter(pl.col("kind") == "wrong_caption").height
    wrong_cut = low.filter(pl.col("kind") == "wrong_caption").height
    out["wrong_caption"] = {
        "count": int(kinds.get("wrong_caption", 0)),
        "roc_auc_clip_score_vs_clean": auc,
        "mean_score_clean": round(float(np.mean(clean_scores)), 4) if len(clean_scores) else None,
        "mean_score_wrong": round(float(np.mean(wrong_scores)), 4) if len(wrong_scores) else None,
        "reached_score_cut": wrong_at_cut,
        "removed_by_score_cut": wrong_cut,
        "score_cut_recall": _fraction(wrong_cut, wrong_at_cut),
        "score_cut_precision": _fraction(wrong_cut, low.height),
        "kept": int(joined.filter((pl.col("kind") == "wrong_caption") & pl.col("kept")).height),
    }

    out["exact_duplicate"] = _pair_metrics(joined, "exact_duplicate")
    out["near_duplicate"] = _pair_metrics(joined, "near_duplicate")

    group = pl.coalesce("source_uid", "uid")
    groups = joined.with_columns(group.alias("_group"))
    rejected_dup = groups.filter(pl.col("reject_reason") == "duplicate")
    cluster_groups = (
        groups.drop_nulls("dedup_cluster")
        .group_by("dedup_cluster", "_group")
        .len()
        .rename({"len": "_members"})
    )
    judged = rejected_dup.join(cluster_groups, on=["dedup_cluster", "_group"], how="left")
    true_dup = judged.filter(pl.col("_members") > 1)
    clean = int(kinds.get("clean", 0))
    clean_wrong = judged.filter((pl.col("kind") == "clean") & ~(pl.col("_members") > 1)).height
    out["duplicate_stage"] = {
        "rejected": rejected_dup.height,
        "precision": _fraction(true_dup.height, rejected_dup.height),
        "clean_removed_as_duplicate": clean_wrong,
        "clean_removed_as_duplicate_fraction": _fraction(clean_wrong, clean),
    }

    leaks = joined.filter(pl.col("kind") == "eval_leak")
    rejected_leak = joined.filter(pl.col("reject_reason") == "eval_leak")
    out["eval_leak"] = {
        "count": leaks.height,
        "removed": int((~leaks["kept"]).sum()),
        "removed_fraction": _fraction(int((~leaks["kept"]).sum()), leaks.height),
        "rejected_as_eval_leak": int((leaks["reject_reason"] == "eval_leak").sum()),
        "precision": _fraction(
            rejected_leak.filter(pl.col("kind") == "eval_leak").height, rejected_leak.height
        ),
    }

    corrupt = joined.filter(pl.col("kind") == "corrupt")
    expected = pl.when(pl.col("variant") == "no_caption").then(pl.lit("no_caption")).otherwise(
        pl.lit("corrupt")
    )
    right = corrupt.filter(pl.col("reject_reason") == expected).height
    flagged = joined.filter(pl.col("reject_reason").is_in(["corrupt", "no_caption"]))
    out["corrupt"] = {
        "count": corrupt.height,
        "rejected": int((~corrupt["kept"]).sum()),
        "rejected_with_expected_reason": right,
        "recall": _fraction(right, corrupt.height),
        "precision": _fraction(flagged.filter(pl.col("kind") == "corrupt").height, flagged.height),
    }

    face_rows = joined.filter(pl.col("kind") == "face")
    face_out: dict[str, Any] = {"count": face_rows.height, "kept": int(face_rows["kept"].sum())}
    if faces is not None:
        found = {uid: boxes for uid, boxes in faces.select("uid", "boxes").iter_rows()}
        boxes_total = boxes_hit = images_hit = images = images_all = 0
        for uid, truth_boxes, kept in face_rows.select("uid", "face_boxes", "kept").iter_rows():
            if not kept or uid not in found:
                continue
            images += 1
            truth_boxes = truth_boxes or []
            hits = box_recall(truth_boxes, found[uid] or [], face_iou)
            boxes_total += len(truth_boxes)
            boxes_hit += hits
            images_hit += bool(found[uid])
            images_all += hits == len(truth_boxes)
        non_face = joined.filter(pl.col("kind").is_not_null() & (pl.col("kind") != "face"))
        false_images = sum(
            1 for uid in non_face["uid"].to_list() if found.get(uid)
        )
        checked = sum(1 for uid in non_face["uid"].to_list() if uid in found)
        face_out.update(
            {
                "kept_face_images_checked": images,
                "images_with_a_detection": images_hit,
                "image_recall": _fraction(images_hit, images),
                "images_with_every_face_blurred": images_all,
                "truth_boxes": boxes_total,
                "truth_boxes_found": boxes_hit,
                "box_recall": _fraction(boxes_hit, boxes_total),
                "box_iou": face_iou,
                "non_face_images_with_a_detection": false_images,
                "non_face_false_positive_rate": _fraction(false_images, checked),
            }
        )
    out["face"] = face_out

    # The sample holds no NSFW image: every sample the NSFW stage judged (none rejected before
    # it in STAGES) that it removed is a false positive.
    before = list(STAGES[:STAGES.index(NSFW)])
    judged = joined.filter(pl.col("kind").is_not_null()
                           & ~pl.col("reject_reason").is_in(before).fill_null(False))
    removed = int((judged["reject_reason"] == NSFW).sum())
    out["nsfw"] = {
        "benign_images_judged": judged.height,
        "removed_as_nsfw": removed,
        "false_positive_rate": _fraction(removed, judged.height),
    }
    return out


def dedup_clusters(dedup: Mapping[str, Any]) -> dict[str, Any]:
    """Per duplicate cluster, the kind of match that joined it (from the ``deduplicate``
    summary): clusters per kind, the largest clusters with their kinds, eval leaks per kind,
    and what copy detection verified."""
    return {
        "clusters": dedup.get("clusters"),
        "by_kind": dict(dedup.get("clusters_by_kind") or {}),
        "largest": list(dedup.get("cluster_match_kinds") or []),
        "eval_leaks_by_kind": dict(dedup.get("eval_matches_by_kind") or {}),
        "copy_detection": dedup.get("copy_detection"),
    }


def build_report(
    manifest: pl.DataFrame,
    stage_stats: Mapping[str, Mapping[str, Any]],
    filter_network: Mapping[str, Any] | None = None,
    truth: pl.DataFrame | None = None,
    faces: pl.DataFrame | None = None,
    face_iou: float = 0.3,
) -> dict[str, Any]:
    """The curation report: the funnel, the score cut, seconds per stage, the dedup, face and
    subset figures and, with a truth table, each stage's precision and recall against it.

    ``stage_stats`` maps each stage (node name) to its summary: ``build_pool_manifest`` gives
    the cut, ``score_pool`` the model, ``score_nsfw``, ``deduplicate``, ``detect_faces`` and
    ``check_dfn_subset`` their figures (the subset's blur check also under ``faces``); ``filter_network`` is the training metadata. Raises
    AssertionError when the funnel does not add up or the subset does not hold the kept rows.
    """
    flow = funnel(manifest)
    if flow["input"] != flow["kept"] + flow["rejected"]:
        raise AssertionError("curation report: input != kept + rejected")
    subset = dict(stage_stats.get("check_dfn_subset") or {})
    dropped = int((stage_stats.get("detect_faces") or {}).get("dropped_unchecked") or 0)
    if subset.get("kept", flow["kept"] - dropped) + dropped != flow["kept"]:
        raise AssertionError(
            f"dfn_manifest has {subset['kept']} rows (+ {dropped} dropped as unchecked for "
            f"faces) but the pool manifest keeps {flow['kept']}"
        )
    selection = stage_stats.get("build_pool_manifest") or {}
    train = dict(filter_network or {})

    def figures(stage: str) -> dict[str, Any]:
        return {k: v for k, v in (stage_stats.get(stage) or {}).items() if k != "seconds"}

    seconds: dict[str, Any] = {}
    for stage, stats in stage_stats.items():
        seconds[stage] = (stats or {}).get("seconds")
        if stage == "build_pool_index":  # the filter network trains between index and scoring
            seconds["train_filter_network"] = train.get("seconds")
    seconds.setdefault("train_filter_network", train.get("seconds"))
    detector = (stage_stats.get("describe_pool") or {}).get("copy_detector") or {}
    if detector:
        seconds["train_copy_detector"] = detector.get("seconds")
    report: dict[str, Any] = {
        "funnel": flow,
        "score_cut": {
            "threshold": selection.get("threshold"),
            "rule": selection.get("threshold_rule"),
            "keep_fraction": selection.get("keep_fraction"),
            "candidates": selection.get("score_cut_candidates"),
            "scoring_model": (stage_stats.get("score_pool") or {}).get("model"),
        },
        "seconds": seconds,
        "filter_network": train,
        "dedup": {k: v for k, v in figures("deduplicate").items() if k != "cluster_match_kinds"},
        "dedup_clusters": dedup_clusters(stage_stats.get("deduplicate") or {}),
        "faces": {**figures("detect_faces"),
                  "blur_check": (stage_stats.get("check_dfn_subset") or {}).get("blur_check")},
        "nsfw": {**figures("score_nsfw"),
                 "removed": flow["by_reason"].get("nsfw", 0)},
        "subset": figures("check_dfn_subset"),
        "truth": None,
    }
    if truth is not None and truth.height:
        report["truth"] = truth_metrics(manifest, truth, faces, face_iou=face_iou)
    found = report["truth"] or {}
    logger.info("report_curation: %d input, %d kept; wrong-caption AUC %s, near-dup recall %s",
                flow["input"], flow["kept"],
                (found.get("wrong_caption") or {}).get("roc_auc_clip_score_vs_clean"),
                (found.get("near_duplicate") or {}).get("detection_recall"))
    return report


__all__ = ["STAGES", "box_recall", "build_report", "dedup_clusters", "funnel", "truth_metrics"]
