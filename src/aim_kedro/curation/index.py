"""Decode every pool sample safely and build the per-sample index (sizes, hashes, caption, reason).

One bad record never stops the run: whatever goes wrong while reading a sample becomes a
``reject_reason`` (``corrupt`` or ``no_caption``) with a human-readable ``reject_detail``; a
shard whose transfer keeps failing becomes ``unreadable_shard`` rows, and img2dataset's failed
downloads (from the shard's parquet sidecar) rows of their own (``curation.attempts``), so the
index has a row for every sample attempted. Shards are read one at a time, so memory holds one
shard's samples plus the compact index rows.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl
from PIL import Image

from aim_kedro.curation.attempts import uid_list_reason, unreadable_rows, with_attempts
from aim_kedro.curation.executors import (
    Executor,
    LocalExecutor,
    ShardTask,
    shard_tasks,
)
from aim_kedro.curation.hashes import (
    color_grid,
    crop_boxes,
    crop_hashes,
    perceptual_hash,
    phashes,
    pixel_sha256,
)
from aim_kedro.curation.reasons import CORRUPT, DUPLICATE_UID, NO_CAPTION
from aim_kedro.io.decode import DecodeError, decode_image
from aim_kedro.io.shards import ERROR_KEY, Sample, ShardSet, image_bytes, sample_json
from aim_kedro.io.sidecars import Sidecar, read_sidecar
from aim_kedro.io.sources import ReadRetry, UnreadableShardError
from aim_kedro.io.uids import UidList, default_uid, sample_uid

logger = logging.getLogger(__name__)


HASH_SCHEMA: dict[str, pl.DataType] = {
    "sha256_bytes": pl.String(),
    "sha256_pixels": pl.String(),
    "phash": pl.UInt64(),
    "phash_crops": pl.List(pl.UInt64()),
    "color_grid": pl.Binary(),
}
"""What dedup compares, computed the same way for pool samples and evaluation images."""

INDEX_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "shard": pl.String(),
    "key": pl.String(),
    "position": pl.UInt32(),
    "width": pl.Int32(),
    "height": pl.Int32(),
    **HASH_SCHEMA,
    "caption": pl.String(),
    "url": pl.String(),
    "reject_reason": pl.String(),
    "reject_detail": pl.String(),
}
"""The index's own columns; a pool with img2dataset / DataComp sidecars adds their extra
columns after these (``Sidecar.extra_columns``)."""


@dataclass(frozen=True)
class IndexConfig:
    """How the pool is read and decoded (``curation.index``): the decompression-bomb limit, the
    caption cap, the hashes (``fast_crop_hashes``: see ``hashes.phashes``), strict JPEG decoding, retries of failed remote reads (``read_retries``
    more tries, waiting ``read_backoff_s`` x 2^k), and ``uid_list``: a DataComp ``.npy`` (path or
    URL) that restricts the pool to its uids (others: ``not_in_uid_list``, not decoded)."""

    max_image_pixels: int = 89_478_485
    max_caption_chars: int = 1_000
    crop_fractions: tuple[float, ...] = (0.05, 0.1)
    color_grid_size: int = 4
    fast_crop_hashes: bool = False
    strict_decoding: bool = True
    read_retries: int = 3
    read_backoff_s: float = 1.0
    uid_list: str | None = None

    @property
    def retry(self) -> ReadRetry:
        """The retry policy of every read of the pool's shards and sidecars."""
        return ReadRetry(int(self.read_retries), float(self.read_backoff_s))

    def load_uid_list(self) -> UidList | None:
        """The ``uid_list`` file, read (None when none is configured); a missing or malformed
        file raises naming ``curation.index.uid_list``."""
        if self.uid_list is None:
            return None
        try:
            return UidList.load(self.uid_list)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"curation.index.uid_list: {exc}") from exc

    def __post_init__(self) -> None:
        if not isinstance(self.fast_crop_hashes, bool):
            raise ValueError(
                f"curation.index.fast_crop_hashes must be true or false, got {self.fast_crop_hashes!r}"
            )
        if not isinstance(self.strict_decoding, bool):
            raise ValueError(
                f"curation.index.strict_decoding must be true or false, got {self.strict_decoding!r}"
            )
        try:
            ReadRetry(self.read_retries, self.read_backoff_s)
        except ValueError as exc:
            raise ValueError(
                f"curation.index.read_retries must be an integer >= 0 and read_backoff_s seconds "
                f">= 0, got {self.read_retries!r} / {self.read_backoff_s!r} ({exc})"
            ) from exc
        if self.uid_list is not None and (not isinstance(self.uid_list, str) or not self.uid_list):
            raise ValueError(
                f"curation.index.uid_list must be the path or URL of a DataComp .npy uid list, "
                f"or null, got {self.uid_list!r}"
            )
        if int(self.max_image_pixels) < 1:
            raise ValueError(
                f"curation.index.max_image_pixels must be >= 1, got {self.max_image_pixels}; "
                "set it to the largest image (in pixels) you accept, e.g. 89478485"
            )
        if int(self.max_caption_chars) < 1:
            raise ValueError(
                f"curation.index.max_caption_chars must be >= 1, got {self.max_caption_chars}; "
                "set a positive length cap, e.g. 1000"
            )
        fractions = tuple(float(f) for f in self.crop_fractions or ())
        if any(not 0.0 < f < 0.5 for f in fractions):
            raise ValueError(
                f"curation.index.crop_fractions must be border cuts in (0, 0.5), got "
                f"{list(self.crop_fractions or ())}; e.g. [0.05, 0.1] ([] disables crop hashes)"
            )
        object.__setattr__(self, "crop_fractions", fractions)
        if not 1 <= int(self.color_grid_size) <= 16:
            raise ValueError(
                f"curation.index.color_grid_size must be in [1, 16] cells, got "
                f"{self.color_grid_size}; 4 keeps 48 bytes per sample"
            )


def image_hashes(image: Image.Image, cfg: IndexConfig) -> dict[str, Any]:
    """The ``HASH_SCHEMA`` columns of a decoded RGB image but ``sha256_bytes`` (what dedup and
    the eval-leak check compare), each computed once."""
    phash, crops = phashes(image, cfg.crop_fractions, cfg.fast_crop_hashes)
    return {
        "sha256_pixels": pixel_sha256(image),
        "phash": phash,
        "phash_crops": crops,
        "color_grid": color_grid(image, cfg.color_grid_size),
    }


def sample_caption(sample: Sample, max_chars: int) -> tuple[str | None, str | None]:
    """``(caption, None)`` or ``(None, why)`` for a missing, empty or non-UTF-8 ``.txt``."""
    value = sample.get("txt")
    if value is None:
        return None, "no caption member"
    if isinstance(value, str):
        text = value
    else:
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"caption is not valid UTF-8: {exc.reason} at byte {exc.start}"
    text = " ".join(text.split())
    if not text:
        return None, "empty caption"
    return text[:max_chars], None


def _error_detail(error: str) -> str:
    if error == "duplicate_key":
        return "duplicate key in shard"
    if error.startswith("truncated_tar"):
        return "truncated tar" + error[len("truncated_tar") :]
    return error


def index_sample(
    sample: Sample, position: int, shard: str, cfg: IndexConfig, uid_list: UidList | None = None
) -> tuple[dict[str, Any], Image.Image | None]:
    """One index row for a sample, plus its decoded RGB image (None when it is rejected, and
    a sample outside ``uid_list`` is not decoded at all)."""
    key = str(sample.get("__key__", f"#{position}"))
    uid = sample_uid(sample, shard)
    url = sample_json(sample).get("url")
    row: dict[str, Any] = {
        "uid": uid,
        "shard": shard,
        "key": key,
        "position": position,
        "width": None,
        "height": None,
        "sha256_bytes": None,
        "sha256_pixels": None,
        "phash": None,
        "phash_crops": None,
        "color_grid": None,
        "caption": None,
        "url": url if isinstance(url, str) else None,
        "reject_reason": None,
        "reject_detail": None,
    }
    error = sample.get(ERROR_KEY)
    if error:
        row.update(reject_reason=CORRUPT, reject_detail=_error_detail(str(error)))
        return row, None
    excluded = uid_list_reason(uid, uid_list)
    if excluded is not None:
        row.update(reject_reason=excluded[0], reject_detail=excluded[1])
        return row, None
    found = image_bytes(sample)
    if found is None:
        row.update(reject_reason=CORRUPT, reject_detail="no image member")
        return row, None
    data = found[1]
    row["sha256_bytes"] = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, cfg.max_image_pixels, strict=cfg.strict_decoding)
    except DecodeError as exc:
        row.update(reject_reason=CORRUPT, reject_detail=str(exc))
        return row, None
    row.update(
        width=image.width,
        height=image.height,
        **image_hashes(image, cfg),
    )
    caption, why = sample_caption(sample, cfg.max_caption_chars)
    row["caption"] = caption
    if caption is None:
        row.update(reject_reason=NO_CAPTION, reject_detail=why)
    return row, image


def index_records(
    samples: Iterable[Sample], shard: str, cfg: IndexConfig, uid_list: UidList | None = None
) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """Index rows and decoded images of one shard's samples, in shard order; never raises,
    except ``UnreadableShardError`` when the shard's transfer keeps failing."""
    for position, sample in enumerate(samples):
        try:
            yield index_sample(sample, position, shard, cfg, uid_list)
        except Exception as exc:  # noqa: BLE001 - one bad record never stops the run
            key = str(sample.get("__key__", f"#{position}"))
            logger.warning("sample %s/%s could not be indexed: %s", shard, key, exc)
            row = {name: None for name in INDEX_SCHEMA}
            row.update(
                uid=default_uid(shard, key),
                shard=shard,
                key=key,
                position=position,
                reject_reason=CORRUPT,
                reject_detail=f"unreadable sample: {type(exc).__name__}: {exc}",
            )
            yield row, None


def index_shard(
    samples: Iterable[Sample], shard: str, cfg: IndexConfig, uid_list: UidList | None = None
) -> pl.DataFrame:
    """The index table of one shard (images are decoded and dropped right away)."""
    rows = [row for row, _ in index_records(samples, shard, cfg, uid_list)]
    return pl.DataFrame(rows, schema=INDEX_SCHEMA, orient="row") if rows else empty_index()


def empty_index() -> pl.DataFrame:
    """An index table with no rows and the full schema."""
    return pl.DataFrame(schema=INDEX_SCHEMA)


def read_task(task: ShardTask, cfg: IndexConfig) -> Iterator[tuple[dict[str, Any], tuple[str, bytes] | None]]:
    """The image members (extension, bytes; None when the sample has none) of one shard task's
    rows (columns shard, position, key, ...), in shard order, not decoded. Raises ValueError
    when a sample's key is not the one the table recorded (the shards changed since the index
    was built)."""
    if task.rows is None or task.rows.height == 0:
        return
    name = task.name
    wanted = {int(row["position"]): row for row in task.rows.iter_rows(named=True)
              if row.get("position") is not None}
    if not wanted:
        return
    last = max(wanted)
    for position, sample in enumerate(task.shards.with_retry(cfg.retry).iter_shard(task.path)):
        row = wanted.get(position)
        if row is not None:
            if str(sample.get("__key__")) != row.get("key", sample.get("__key__")):
                raise ValueError(
                    f"{name} position {position} holds key {sample.get('__key__')!r}, "
                    f"the index says {row.get('key')!r}: the pool changed since "
                    "pool_index was built; re-run build_pool_index"
                )
            yield row, image_bytes(sample)
        if position >= last:
            break


def decode_member(
    found: tuple[str, bytes] | None, cfg: IndexConfig, min_side: int | None = None
) -> Image.Image | None:
    """``decode_image`` of a ``read_task`` member as the index decoded it (a JPEG at reduced
    scale with ``min_side``); None when there is none or it no longer decodes."""
    if found is None:
        return None
    try:
        return decode_image(found[1], cfg.max_image_pixels, strict=cfg.strict_decoding,
                            min_side=min_side)
    except DecodeError:
        return None


def decode_task(
    task: ShardTask, cfg: IndexConfig, min_side: int | None = None
) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """Decoded images of one shard task's rows (``read_task``; ``min_side``: see
    ``decode_image``), in shard order; ``image`` is None when the bytes no longer decode."""
    for row, found in read_task(task, cfg):
        yield row, decode_member(found, cfg, min_side)


def decode_selected(
    shards: ShardSet, table: pl.DataFrame, cfg: IndexConfig
) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """Decoded images of the rows of ``table`` (columns shard, position, key, ...), shard by
    shard in the pool's order (``decode_task`` per shard); only one shard's wanted rows are held
    at a time."""
    for task in shard_tasks(shards, table):
        yield from decode_task(task, cfg)


def mark_duplicate_uids(index: pl.DataFrame) -> pl.DataFrame:
    """Give every repeat of a uid already seen a deterministic uid of its own, so that ``uid`` is
    a key of every table downstream, and reject it (``duplicate_uid``, "duplicate uid <uid>")
    unless an earlier reason already rejects it."""
    if index["uid"].n_unique() == index.height:
        return index  # the common case, checked without a per-group window
    repeat = pl.col("uid").cum_count().over("uid") > 1
    fresh = [
        default_uid(shard, f"{key}#{position}")
        for shard, key, position in index.select("shard", "key", "position").iter_rows()
    ]
    newly = repeat & pl.col("reject_reason").is_null()
    return index.with_columns(
        pl.when(newly)
        .then(pl.lit("duplicate uid ") + pl.col("uid"))
        .otherwise(pl.col("reject_detail"))
        .alias("reject_detail"),
        pl.when(newly).then(pl.lit(DUPLICATE_UID)).otherwise(pl.col("reject_reason"))
        .alias("reject_reason"),
        pl.when(repeat).then(pl.Series(fresh)).otherwise(pl.col("uid")).alias("uid"),
    )


def index_task(task: ShardTask, cfg: IndexConfig, uid_list: UidList | None = None) -> pl.DataFrame:
    """Stage function: the index table of one shard task: every sample of the shard, plus the
    samples its img2dataset sidecar lists that it does not hold, with the sidecar's url and
    extra columns. A shard (or sidecar) whose transfer keeps failing, or whose sidecar is
    broken, gives ``unreadable_shard`` rows instead, and nothing of what was read of it."""
    shards = task.shards.with_retry(cfg.retry)
    sidecar: Sidecar | None = None
    try:
        sidecar = read_sidecar(task.path, task.name, cfg.retry, shards.storage_options)
        rows = index_shard(shards.iter_shard(task.path), task.name, cfg, uid_list)
    except (UnreadableShardError, ValueError) as exc:
        cause = exc.cause if isinstance(exc, UnreadableShardError) else str(exc)
        logger.warning("shard %s is recorded as unreadable: %s", task.name, cause)
        return unreadable_rows(task.name, cause, sidecar, INDEX_SCHEMA, uid_list)
    return with_attempts(rows, sidecar, task.name, INDEX_SCHEMA, uid_list)


def build_index(
    shards: ShardSet, cfg: IndexConfig, executor: Executor | None = None, progress: bool = True
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Index every shard of a pool, one task per shard on ``executor`` (local by default);
    return the table (``INDEX_SCHEMA``, then the sidecars' extra columns) and a summary."""
    executor = executor or LocalExecutor(progress)
    start = time.perf_counter()
    uid_list = cfg.load_uid_list()
    frames = executor.map_shards(
        functools.partial(index_task, cfg=cfg, uid_list=uid_list), shard_tasks(shards),
        desc="index shards",
    )
    # Not rechunked: the shards' tables become the chunks of the index, not a second copy.
    index = pl.concat(frames, how="diagonal_relaxed", rechunk=False) if frames else empty_index()
    index = index.select(list(INDEX_SCHEMA) + [c for c in index.columns if c not in INDEX_SCHEMA])
    index = mark_duplicate_uids(index)
    reasons = dict(
        index.group_by("reject_reason").len().drop_nulls("reject_reason").iter_rows()
    )
    summary = {
        "shards": len(shards.shards),
        "samples": index.height,
        "uid_list": None if uid_list is None else {"file": uid_list.source, "uids": len(uid_list)},
        "valid": index.height - sum(reasons.values()),
        "rejected": reasons,
        **executor.describe(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return index, summary


__all__ = [
    "CORRUPT",
    "NO_CAPTION",
    "INDEX_SCHEMA",
    "IndexConfig",
    "build_index",
    "color_grid",
    "crop_boxes",
    "crop_hashes",
    "decode_member",
    "decode_selected",
    "decode_task",
    "empty_index",
    "index_records",
    "index_sample",
    "index_shard",
    "image_hashes",
    "index_task",
    "mark_duplicate_uids",
    "perceptual_hash",
    "phashes",
    "pixel_sha256",
    "read_task",
    "sample_caption",
]
