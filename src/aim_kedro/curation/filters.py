"""DataComp's basic filters, the NSFW cut and the DFN score threshold, as per-sample decisions.

Every function returns reasons instead of dropping rows, so the manifest can account for every
sample. The score cut is global (one threshold over the whole pool) and works on a compact
array of scores; the other filters look at one row at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.reasons import BASIC_FILTER, LOW_CLIP_SCORE, NSFW

DECISION_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "reject_reason": pl.String(),
    "reject_detail": pl.String(),
}


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the filtering stage (``curation.filters`` in the parameters).

    ``keep_fraction`` keeps the best-scoring fraction of the samples that reach the score cut
    (DFN keeps 0.15); an absolute ``threshold`` on ``clip_score`` replaces it when set. The basic
    filters follow DataComp: shorter side, aspect ratio and caption length in words.
    ``nsfw_threshold`` rejects samples whose zero-shot ``nsfw_score`` is at least that (null: no
    cut); ``nsfw_classifier_threshold`` those whose NSFW classifier score (``curation.nsfw``) is.
    The defaults are conf/base's, tuned for the sample (DFN: keep_fraction 0.15; DataComp:
    min_shorter_side 200; with a real CLIP, nsfw_threshold 0.5).
    """

    keep_fraction: float | None = 0.7
    threshold: float | None = None
    min_shorter_side: int = 48
    max_aspect_ratio: float = 3.0
    min_caption_words: int = 2
    nsfw_threshold: float | None = None
    nsfw_classifier_threshold: float | None = 0.6

    def __post_init__(self) -> None:
        if self.threshold is None and self.keep_fraction is None:
            raise ValueError(
                "curation.filters needs keep_fraction (e.g. 0.15) or an absolute threshold on "
                "clip_score; both are null"
            )
        if self.threshold is None:
            fraction = self.keep_fraction
            if (
                isinstance(fraction, bool)
                or not isinstance(fraction, int | float)
                or not 0.0 < float(fraction) <= 1.0
            ):
                raise ValueError(
                    f"curation.filters.keep_fraction must be in (0, 1], got {fraction!r}; "
                    "set the fraction of scored samples to keep, e.g. 0.15 as in DFN "
                    "(1.0 keeps all), or set curation.filters.threshold instead"
                )
        elif not isinstance(self.threshold, int | float) or not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(
                f"curation.filters.threshold must be a cosine in [-1, 1] or null, got "
                f"{self.threshold!r}; use null to keep curation.filters.keep_fraction instead"
            )
        if int(self.min_shorter_side) < 0:
            raise ValueError(
                f"curation.filters.min_shorter_side must be >= 0 px, got {self.min_shorter_side}"
            )
        if float(self.max_aspect_ratio) < 1.0:
            raise ValueError(
                f"curation.filters.max_aspect_ratio must be >= 1 (long side / short side), got "
                f"{self.max_aspect_ratio}"
            )
        if int(self.min_caption_words) < 0:
            raise ValueError(
                f"curation.filters.min_caption_words must be >= 0, got {self.min_caption_words}"
            )
        if self.nsfw_threshold is not None and not 0.0 <= float(self.nsfw_threshold) <= 1.0:
            raise ValueError(
                f"curation.filters.nsfw_threshold must be in [0, 1] or null (no NSFW cut), got "
                f"{self.nsfw_threshold}"
            )

        threshold = self.nsfw_classifier_threshold
        if threshold is not None and (isinstance(threshold, bool) or not 0.0 < float(threshold) <= 1.0):
            raise ValueError(
                f"curation.filters.nsfw_classifier_threshold must be in (0, 1] or null (no cut "
                f"on the classifier's score), got {threshold!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> FilterConfig:
        """Build from ``curation.filters``; an unknown key raises a ValueError naming the valid ones."""
        return from_mapping(cls, values, "curation.filters")


def caption_words(caption: str | None) -> int:
    """Number of whitespace-separated words of a caption (0 for None)."""
    return len(caption.split()) if caption else 0


def basic_filter_detail(
    width: int | None, height: int | None, caption: str | None, cfg: FilterConfig
) -> str | None:
    """Why a sample fails DataComp's basic filters, or None when it passes."""
    problems = []
    if width is not None and height is not None and width > 0 and height > 0:
        short, long = min(width, height), max(width, height)
        if short < cfg.min_shorter_side:
            problems.append(f"shorter side {short} px < {cfg.min_shorter_side}")
        if long / short > cfg.max_aspect_ratio:
            problems.append(f"aspect ratio {long / short:.2f} > {cfg.max_aspect_ratio:g}")
    words = caption_words(caption)
    if words < cfg.min_caption_words:
        problems.append(f"caption has {words} word(s) < {cfg.min_caption_words}")
    return "; ".join(problems) or None


def _nsfw_detail(nsfw: float | None, classifier: float | None, label: str | None,
                 cfg: FilterConfig) -> str | None:
    """Why a sample is NSFW (the zero-shot score, then the classifier's), or None."""
    if cfg.nsfw_threshold is not None and nsfw is not None and not math.isnan(nsfw) \
            and nsfw >= cfg.nsfw_threshold:
        return f"nsfw_score {nsfw:.3f} >= {cfg.nsfw_threshold:g}"
    limit = cfg.nsfw_classifier_threshold
    if limit is not None and classifier is not None and not math.isnan(classifier) \
            and classifier >= limit:
        return f"nsfw classifier {label or 'score'} {classifier:.3f} >= {limit:g}"
    return None


def filter_decisions(
    index: pl.DataFrame,
    scores: pl.DataFrame,
    cfg: FilterConfig,
    classifier_scores: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Basic-filter and NSFW decisions for the samples the index accepted.

    ``index`` has uid, width, height, caption, reject_reason; ``scores`` has uid and nsfw_score;
    ``classifier_scores`` (``curation.nsfw``'s table) uid, nsfw_classifier_score and
    nsfw_classifier_label. Returns one row per index row: uid, reject_reason
    (``basic_filter``, ``nsfw`` or null), reject_detail. Samples the index already rejected get
    null here (their reason comes first).
    """
    table = index.select("uid", "width", "height", "caption", "reject_reason").join(
        scores.select("uid", "nsfw_score"), on="uid", how="left"
    )
    if classifier_scores is not None and classifier_scores.height:
        table = table.join(classifier_scores.select(
            "uid", "nsfw_classifier_score", "nsfw_classifier_label"), on="uid", how="left",
            maintain_order="left")
    else:
        table = table.with_columns(nsfw_classifier_score=pl.lit(None, pl.Float32),
                                   nsfw_classifier_label=pl.lit(None, pl.String))
    reasons: list[str | None] = []
    details: list[str | None] = []
    for width, height, caption, earlier, nsfw, classifier, label in table.select(
        "width", "height", "caption", "reject_reason", "nsfw_score", "nsfw_classifier_score",
        "nsfw_classifier_label",
    ).iter_rows():
        if earlier is not None:
            reasons.append(None)
            details.append(None)
            continue
        detail = basic_filter_detail(width, height, caption, cfg)
        nsfw_detail = None if detail is not None else _nsfw_detail(nsfw, classifier, label, cfg)
        reasons.append(BASIC_FILTER if detail is not None else NSFW if nsfw_detail else None)
        details.append(detail or nsfw_detail)
    return pl.DataFrame(
        {"uid": table["uid"], "reject_reason": reasons, "reject_detail": details},
        schema=DECISION_SCHEMA,
    )


def select_by_score(scores: np.ndarray, cfg: FilterConfig) -> tuple[np.ndarray, float]:
    """Which candidates pass the score cut, and the threshold used.

    With ``keep_fraction`` the best ``ceil(keep_fraction * n)`` scores are kept (ties broken by
    position, so the count is exact); the threshold reported is the lowest kept score. With an
    absolute ``threshold`` every score >= it is kept. NaN scores never pass.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    keep = np.zeros(n, dtype=bool)
    finite = np.isfinite(scores)
    if cfg.threshold is not None:
        keep = finite & (scores >= float(cfg.threshold))
        return keep, float(cfg.threshold)
    assert cfg.keep_fraction is not None
    k = min(int(finite.sum()), math.ceil(float(cfg.keep_fraction) * n - 1e-9))
    if n == 0 or k == 0:
        return keep, float("nan")
    ranked = np.where(finite, scores, -np.inf)
    order = np.lexsort((np.arange(n), -ranked))
    keep[order[:k]] = True
    return keep, float(scores[order[k - 1]])


def filter_summary(pool_index: pl.DataFrame, decisions: pl.DataFrame) -> dict[str, Any]:
    """How many samples the filters checked (those the index accepted) and rejected per reason."""
    counts = dict(decisions.group_by("reject_reason").len().drop_nulls().iter_rows())
    return {"checked": int(pool_index["reject_reason"].is_null().sum()), **counts}


__all__ = [
    "BASIC_FILTER",
    "DECISION_SCHEMA",
    "LOW_CLIP_SCORE",
    "NSFW",
    "FilterConfig",
    "basic_filter_detail",
    "caption_words",
    "filter_decisions",
    "filter_summary",
    "select_by_score",
]
