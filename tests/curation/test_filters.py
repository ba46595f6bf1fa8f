"""DataComp basic filters, the NSFW cut and the DFN score threshold."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from aim_kedro.curation.filters import (
    FilterConfig,
    basic_filter_detail,
    filter_decisions,
    select_by_score,
)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, "half", True])
def test_keep_fraction_outside_0_1_is_refused_with_the_fix(fraction) -> None:
    with pytest.raises(ValueError, match=r"curation\.filters\.keep_fraction must be in \(0, 1\]"):
        FilterConfig(keep_fraction=fraction)


def test_other_parameters_are_checked() -> None:
    FilterConfig(keep_fraction=1.0)
    FilterConfig(keep_fraction=None, threshold=0.3)
    with pytest.raises(ValueError, match="keep_fraction .* or an absolute threshold"):
        FilterConfig(keep_fraction=None, threshold=None)
    with pytest.raises(ValueError, match="curation.filters.threshold"):
        FilterConfig(threshold=2.0)
    with pytest.raises(ValueError, match="curation.filters.max_aspect_ratio"):
        FilterConfig(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="curation.filters.nsfw_threshold"):
        FilterConfig(nsfw_threshold=1.5)
    with pytest.raises(ValueError, match="unknown curation.filters parameter"):
        FilterConfig.from_dict({"keep_fraction": 0.2, "keep_frac": 0.1})


def test_basic_filters_name_what_fails() -> None:
    cfg = FilterConfig(min_shorter_side=32, max_aspect_ratio=2.0, min_caption_words=2)
    assert basic_filter_detail(64, 64, "two words", cfg) is None
    assert basic_filter_detail(64, 16, "two words", cfg) == (
        "shorter side 16 px < 32; aspect ratio 4.00 > 2"
    )
    assert basic_filter_detail(64, 64, "one", cfg) == "caption has 1 word(s) < 2"


def test_filter_decisions_keep_index_rejections_out() -> None:
    index = pl.DataFrame(
        {
            "uid": ["ok", "small", "nsfw", "bad"],
            "width": [64, 10, 64, None],
            "height": [64, 64, 64, None],
            "caption": ["a fine photo", "a small one", "a photo here", None],
            "reject_reason": [None, None, None, "corrupt"],
        }
    )
    scores = pl.DataFrame({"uid": ["ok", "small", "nsfw"], "nsfw_score": [0.1, 0.9, 0.8]})
    cfg = FilterConfig(min_shorter_side=32, nsfw_threshold=0.5)
    out = filter_decisions(index, scores, cfg)
    assert out["reject_reason"].to_list() == [None, "basic_filter", "nsfw", None]
    assert out["reject_detail"][2] == "nsfw_score 0.800 >= 0.5"
    off = filter_decisions(index, scores, FilterConfig(min_shorter_side=32, nsfw_threshold=None))
    assert off["reject_reason"].to_list() == [None, "basic_filter", None, None]


def test_keep_fraction_keeps_an_exact_count_with_ties_and_nans() -> None:
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.1, 0.5])
    keep, threshold = select_by_score(scores, FilterConfig(keep_fraction=0.5))
    assert keep.sum() == 3 and keep.tolist() == [True, True, True, False, False, False]
    assert threshold == 0.5
    keep, _ = select_by_score(scores, FilterConfig(keep_fraction=1.0))
    assert keep.sum() == 5 and not keep[3]
    keep, threshold = select_by_score(np.array([]), FilterConfig(keep_fraction=0.15))
    assert keep.size == 0 and math.isnan(threshold)


def test_absolute_threshold_replaces_the_fraction() -> None:
    keep, threshold = select_by_score(
        np.array([0.2, 0.3, 0.31, np.nan]), FilterConfig(keep_fraction=None, threshold=0.3)
    )
    assert keep.tolist() == [False, True, True, False] and threshold == 0.3


def test_filter_summary_counts_the_checked_samples_and_each_reason() -> None:
    from aim_kedro.curation.filters import filter_summary

    index = pl.DataFrame({"uid": ["a", "b", "c", "d"], "reject_reason": [None, None, None, "corrupt"]})
    decisions = pl.DataFrame({"uid": ["a", "b", "c"],
                              "reject_reason": [None, "basic_filter", "basic_filter"]})
    assert filter_summary(index, decisions) == {"checked": 3, "basic_filter": 2}
