"""The copy-detection passes over a pool: the descriptor's training images, and the descriptors.

``training_images`` decodes a fixed random subset of the decodable pool rows (shard by shard)
for ``copydetect.train_copy_detector``. ``describe_index`` is the per-shard descriptor pass on
the run's executor, one decode per sample: ``describe_batches`` (CPU: a shard's rows decoded,
border-trimmed and squashed to the descriptor's size, in batches) and ``describe_records``
(the model: ``Describer.describe_tensor``), so Ray runs the model in actors as it does the CLIP
scorer. ``descriptor_table`` / ``aligned_descriptors`` store and align the result;
``pool_loader`` decodes the pool rows that verification compares.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image

from aim_kedro.curation.copydetect import Describer, DescriptorConfig, load_describer, to_tensor
from aim_kedro.curation.executors import Executor, LocalExecutor, ModelStage, ShardTask, shard_tasks
from aim_kedro.curation.index import IndexConfig, decode_selected, decode_task
from aim_kedro.curation.verify import ImageLoader
from aim_kedro.io.shards import ShardSet

logger = logging.getLogger(__name__)

DESCRIPTOR_COLUMNS = ("uid", "descriptor")


def describable(pool_index: pl.DataFrame) -> pl.DataFrame:
    """The index rows that decode (they have a pHash): the rows dedup compares."""
    return pool_index.filter(pl.col("phash").is_not_null())


def training_images(
    shards: ShardSet, pool_index: pl.DataFrame, cfg: DescriptorConfig, index_cfg: IndexConfig
) -> torch.Tensor:
    """Up to ``cfg.train_images`` decodable pool images (a random subset fixed by ``cfg.seed``)
    as a ``[N, 3, S, S]`` uint8 tensor at ``cfg.image_size``, border-trimmed as described."""
    rows = describable(pool_index)
    if rows.height > cfg.train_images:
        pick = np.sort(np.random.default_rng(cfg.seed).choice(rows.height, cfg.train_images,
                                                               replace=False))
        rows = rows[pick.tolist()]
    images = [image for _, image in decode_selected(shards, rows, index_cfg) if image is not None]
    return to_tensor(images, cfg.image_size)


def pool_loader(shards: ShardSet, pool: pl.DataFrame, index_cfg: IndexConfig) -> ImageLoader:
    """An ``ImageLoader`` of ``pool`` rows (columns shard, position, key) for verification:
    each call decodes the wanted rows from ``shards``, shard by shard."""
    located = pool.select("shard", "position", "key").with_row_index("_row")

    def load(rows: Sequence[int]) -> Iterator[tuple[int, Image.Image | None]]:
        wanted = located[sorted(int(r) for r in rows)]
        for row, image in decode_selected(shards, wanted, index_cfg):
            yield int(row["_row"]), image

    return load


def describe_batches(
    task: ShardTask, index_cfg: IndexConfig, image_size: int, batch_size: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Stage function: one shard's rows as ``(uids, [B, 3, S, S] uint8)`` batches of decoded,
    border-trimmed images (undecodable rows are left out: they get no descriptor)."""
    uids: list[str] = []
    images = []
    for row, image in decode_task(task, index_cfg):
        if image is None:
            continue
        uids.append(row["uid"])
        images.append(image)
        if len(images) == batch_size:
            yield uids, to_tensor(images, image_size)
            uids, images = [], []
    if images:
        yield uids, to_tensor(images, image_size)


def describe_records(describer: Describer, part: tuple[list[str], torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """Stage function: the descriptors of one batch."""
    uids, batch = part
    return uids, describer.describe_tensor(batch)


def describe_index(
    make_describer: Callable[[], Describer],
    shards: ShardSet,
    index: pl.DataFrame,
    index_cfg: IndexConfig,
    image_size: int,
    batch_size: int = 256,
    executor: Executor | None = None,
    want_gpu: bool = False,
    progress: bool = True,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Descriptors of the rows of ``index`` (uid, shard, position, key), shard by shard on
    ``executor``; returns ``descriptor_table`` rows (decodable rows only) and a summary."""
    executor = executor or LocalExecutor(progress)
    start = time.perf_counter()
    tasks = shard_tasks(shards, index, order="table")
    stage = ModelStage(
        make_describer,
        functools.partial(describe_batches, index_cfg=index_cfg, image_size=image_size,
                          batch_size=batch_size),
        describe_records,
        want_gpu=want_gpu,
    )
    uids: list[str] = []
    parts: list[np.ndarray] = []
    for results in executor.map_model(stage, tasks, desc="describe pool"):
        for part_uids, descriptors in results:
            uids.extend(part_uids)
            parts.append(np.asarray(descriptors, dtype=np.float16))
    dim = parts[0].shape[1] if parts else 0
    table = descriptor_table(uids, np.concatenate(parts) if parts else np.zeros((0, dim), np.float16))
    summary = {"described": table.height, "shards": len(tasks), "dim": int(dim),
               **executor.describe(want_gpu=want_gpu),
               "seconds": round(time.perf_counter() - start, 3)}
    logger.info("describe pool: %d descriptors of %d rows in %d shards in %.1f s", table.height,
                index.height, len(tasks), summary["seconds"])
    return table, summary


def descriptor_table(uids: list[str], descriptors: np.ndarray) -> pl.DataFrame:
    """``copy_descriptors``: uid and a float16 descriptor array per described sample."""
    return pl.DataFrame({"uid": pl.Series(uids, dtype=pl.String),
                         "descriptor": pl.Series(np.asarray(descriptors, np.float16))})


def aligned_descriptors(uids: pl.Series, table: pl.DataFrame) -> np.ndarray:
    """The descriptors of ``table`` (uid, descriptor) in the order of ``uids``, float32; rows
    without one are zeros (they take part in no descriptor match)."""
    aligned = pl.DataFrame({"uid": uids}).join(table, on="uid", how="left", maintain_order="left")
    dim = table["descriptor"].dtype.size if table.height else 1
    out = np.zeros((len(uids), dim), dtype=np.float32)
    present = aligned["descriptor"].is_not_null().to_numpy()
    if present.any():
        out[present] = aligned.filter(pl.col("descriptor").is_not_null())["descriptor"].to_numpy()
    return out


def describe_pool_stage(
    shards: ShardSet, pool_index: pl.DataFrame, descriptor: DescriptorConfig,
    copy_detector: dict[str, Any] | None, index_cfg: IndexConfig, executor: Executor | None,
    enabled: bool = True, progress: bool = True,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Copy descriptors (uid, descriptor) of every decodable pool sample with ``descriptor``'s
    pretrained model or the trained ``copy_detector`` (empty when not ``enabled``), and a
    summary that carries the detector's training metadata."""
    training = dict((copy_detector or {}).get("metadata") or {})
    if not enabled:
        table = pl.DataFrame(schema={"uid": pl.String(), "descriptor": pl.Array(pl.Float16(), 1)})
        return table, {"described": 0, "skipped": True, "copy_detector": training, "seconds": 0.0}
    make = functools.partial(load_describer, descriptor, copy_detector)
    size = int(descriptor.image_size if descriptor.path else copy_detector["config"]["image_size"])
    table, summary = describe_index(
        make, shards, describable(pool_index), index_cfg, size, descriptor.batch_size_inference,
        executor, want_gpu=descriptor.device != "cpu", progress=progress,
    )
    summary["copy_detector"] = training
    return table, summary


__all__ = [
    "DESCRIPTOR_COLUMNS",
    "aligned_descriptors",
    "describable",
    "describe_batches",
    "describe_index",
    "describe_pool_stage",
    "describe_records",
    "descriptor_table",
    "pool_loader",
    "training_images",
]
