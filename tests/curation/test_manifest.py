"""The pool manifest: decision order, the score cut over the deduplicated survivors, accounting."""

from __future__ import annotations

import math

import polars as pl
import pytest

from aim_kedro.curation.filters import FilterConfig
from aim_kedro.curation.manifest import (
    DFN_MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    build_manifest,
    dfn_manifest,
    subset_rows,
)

S = pl.String


def _stage(uids: list[str], reasons: dict[str, str], **extra) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "uid": uids,
            "reject_reason": [reasons.get(u) for u in uids],
            "reject_detail": [f"{reasons[u]} detail" if u in reasons else None for u in uids],
            **extra,
        },
        schema_overrides={"reject_reason": S, "reject_detail": S},
    )


def _tables(scores: dict[str, float | None], index: dict[str, str] | None = None,
            filters: dict[str, str] | None = None, dedup: dict[str, str] | None = None):
    uids = list(scores)
    pool_index = _stage(uids, index or {}).with_columns(
        shard=pl.lit("shard-000000.tar"), key=pl.Series(uids), position=pl.Series(
            range(len(uids)), dtype=pl.UInt32),
    )
    clip_scores = pl.DataFrame({"uid": [u for u in uids if scores[u] is not None],
                                "clip_score": [s for s in scores.values() if s is not None]},
                               schema={"uid": S, "clip_score": pl.Float32})
    decisions = _stage(uids, filters or {})
    dedup_decisions = _stage(uids, dedup or {}, dedup_cluster=pl.Series([None] * len(uids),
                                                                         dtype=pl.Int64),
                             eval_id=pl.Series([None] * len(uids), dtype=S))
    return pool_index, clip_scores, decisions, dedup_decisions


def test_the_first_reason_wins_in_decision_order() -> None:
    tables = _tables(
        {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": None},
        index={"e": "corrupt", "b": "no_caption"},
        filters={"b": "basic_filter", "c": "nsfw"},
        dedup={"c": "duplicate", "d": "eval_leak"},
    )
    manifest, summary = build_manifest(*tables, FilterConfig(keep_fraction=1.0))
    assert manifest.schema == pl.Schema(MANIFEST_SCHEMA)
    assert manifest["uid"].to_list() == ["a", "b", "c", "d", "e"]
    assert manifest["reject_reason"].to_list() == [None, "no_caption", "nsfw", "eval_leak",
                                                   "corrupt"]
    assert manifest["reject_detail"].to_list()[1:] == [
        "no_caption detail", "nsfw detail", "eval_leak detail", "corrupt detail"]
    assert manifest["kept"].to_list() == [True, False, False, False, False]
    assert summary["input"] == 5 == summary["kept"] + summary["rejected"]
    assert summary["score_cut_candidates"] == 1


def test_cut_keeps_ceil_of_the_fraction_of_the_deduplicated_survivors() -> None:
    scores = {f"u{i}": 0.1 * i for i in range(10)}
    tables = _tables(scores, dedup={"u9": "duplicate", "u8": "duplicate"})
    manifest, summary = build_manifest(*tables, FilterConfig(keep_fraction=0.3))
    # 8 survivors: ceil(0.3 * 8) = 3 kept, the best three that are not duplicates
    assert summary["score_cut_candidates"] == 8 and summary["kept"] == math.ceil(0.3 * 8)
    assert manifest.filter(pl.col("kept"))["uid"].to_list() == ["u5", "u6", "u7"]
    cut = manifest.filter(pl.col("reject_reason") == "low_clip_score")
    assert cut.height == 5 and cut["reject_detail"][0].startswith("clip_score 0.0000 not in top 0.3")
    assert summary["threshold"] == pytest.approx(0.5, abs=1e-6)
    assert summary["threshold_rule"] == "keep_fraction" and summary["keep_fraction"] == 0.3


def test_absolute_threshold_and_nan_scores_are_never_kept() -> None:
    tables = _tables({"a": 0.31, "b": 0.3, "c": 0.29, "d": float("nan"), "e": None})
    manifest, summary = build_manifest(*tables, FilterConfig(keep_fraction=None, threshold=0.3))
    assert manifest["kept"].to_list() == [True, True, False, False, False]
    assert summary["threshold"] == 0.3 and summary["threshold_rule"] == "absolute"
    assert ">= threshold 0.3" in manifest["reject_detail"][2]
    every, _ = build_manifest(*tables, FilterConfig(keep_fraction=1.0))
    assert every["kept"].to_list() == [True, True, True, False, False]  # NaN and missing: cut
    assert set(every.filter(~pl.col("kept"))["reject_reason"]) == {"low_clip_score"}


def test_accounting_errors_are_raised() -> None:
    pool_index, scores, decisions, dedup = _tables({"a": 0.5, "b": 0.4})
    with pytest.raises(AssertionError, match="uids repeat across the stage tables"):
        build_manifest(pool_index, scores, pl.concat([decisions, decisions]), dedup,
                       FilterConfig(keep_fraction=1.0))
    twice = pl.concat([pool_index, pool_index])
    with pytest.raises(AssertionError, match="does not add up"):
        build_manifest(twice, scores, decisions, dedup, FilterConfig(keep_fraction=1.0))


def test_subset_rows_carry_what_the_subset_writes() -> None:
    pool_index, scores, decisions, dedup = _tables({"a": 0.5, "b": 0.4, "c": 0.1})
    manifest, _ = build_manifest(pool_index, scores, decisions, dedup,
                                 FilterConfig(keep_fraction=0.5))
    index = pool_index.with_columns(caption=pl.Series(["one cap", "two cap", "three cap"]))
    nsfw = scores.with_columns(nsfw_score=pl.lit(0.1, dtype=pl.Float32))
    faces = pl.DataFrame({"uid": ["b"], "boxes": [[[1, 2, 3, 4]]], "face_count": [1]},
                         schema={"uid": S, "boxes": pl.List(pl.List(pl.Int32)),
                                 "face_count": pl.Int32})
    rows = subset_rows(manifest, index, nsfw, faces)
    assert rows["uid"].to_list() == ["a", "b"] and rows["face_count"].to_list() == [0, 1]
    assert rows["boxes"].to_list() == [[], [[1, 2, 3, 4]]]
    table = dfn_manifest(rows)
    assert tuple(table.columns) == DFN_MANIFEST_COLUMNS
    assert table["face_boxes"].to_list() == [[], [[1, 2, 3, 4]]]
    with pytest.raises(AssertionError, match="1 kept samples have no caption"):
        subset_rows(manifest, index.with_columns(caption=pl.Series(["x", None, "z"])), nsfw, faces)
