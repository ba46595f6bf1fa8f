"""The reject reasons of curation, in the order the decisions are taken.

A sample carries the first reason that applies, so ``STAGES`` is also the funnel's order, which
starts at every sample attempted (img2dataset's failed downloads included); every stage names
its reasons from here, and the report refuses a reason it does not know.
"""

NOT_IN_UID_LIST = "not_in_uid_list"
FAILED_DOWNLOAD = "failed_download"
FAILED_RESIZE = "failed_resize"
UNREADABLE_SHARD = "unreadable_shard"
CORRUPT = "corrupt"
NO_CAPTION = "no_caption"
DUPLICATE_UID = "duplicate_uid"
BASIC_FILTER = "basic_filter"
NSFW = "nsfw"
EVAL_LEAK = "eval_leak"
DUPLICATE = "duplicate"
LOW_CLIP_SCORE = "low_clip_score"

STAGES: tuple[str, ...] = (
    NOT_IN_UID_LIST,
    FAILED_DOWNLOAD,
    FAILED_RESIZE,
    UNREADABLE_SHARD,
    CORRUPT,
    NO_CAPTION,
    DUPLICATE_UID,
    BASIC_FILTER,
    NSFW,
    EVAL_LEAK,
    DUPLICATE,
    LOW_CLIP_SCORE,
)
"""Reject reasons in the order the decisions are taken; a sample gets the first that applies:
outside the configured uid list, not downloaded or not resized by img2dataset, in a shard that
stayed unreadable, undecodable, without a caption, a repeat of a uid, then the filters, dedup
and the score cut."""

__all__ = [
    "BASIC_FILTER", "CORRUPT", "DUPLICATE", "DUPLICATE_UID", "EVAL_LEAK", "FAILED_DOWNLOAD",
    "FAILED_RESIZE", "LOW_CLIP_SCORE", "NOT_IN_UID_LIST", "NO_CAPTION", "NSFW", "STAGES",
    "UNREADABLE_SHARD",
]
