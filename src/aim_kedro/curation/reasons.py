"""The reject reasons of curation, in the order the decisions are taken.

A sample carries the first reason that applies, so ``STAGES`` is also the funnel's order; every
stage names its reasons from here, and the report refuses a reason it does not know.
"""

CORRUPT = "corrupt"
NO_CAPTION = "no_caption"
BASIC_FILTER = "basic_filter"
NSFW = "nsfw"
EVAL_LEAK = "eval_leak"
DUPLICATE = "duplicate"
LOW_CLIP_SCORE = "low_clip_score"

STAGES: tuple[str, ...] = (
    CORRUPT,
    NO_CAPTION,
    BASIC_FILTER,
    NSFW,
    EVAL_LEAK,
    DUPLICATE,
    LOW_CLIP_SCORE,
)
"""Reject reasons in the order the decisions are taken; a sample gets the first that applies."""

__all__ = [
    "BASIC_FILTER", "CORRUPT", "DUPLICATE", "EVAL_LEAK", "LOW_CLIP_SCORE", "NO_CAPTION", "NSFW",
    "STAGES",
]
