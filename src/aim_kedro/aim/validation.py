"""The held-out loss of pre-training: fixed-seed prefixes over the same batches at every step,
the same batch count on every rank, kept in memory when small."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from aim_kedro.aim.data import ShardSource, eval_batches
from aim_kedro.aim.distributed import Dist, reduce_min
from aim_kedro.aim.masks import sample_prefix_len
from aim_kedro.aim.presets import AIMConfig

VAL_CACHE_BYTES = 512 * 2**20


@torch.no_grad()
def validation_loss(
    module: nn.Module, batches: list[torch.Tensor] | Any, num_patches: int, seed: int,
    device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
) -> float | None:
    """Mean pixel loss over the held-out batches with prefixes from a FIXED generator seed, so
    values are comparable across steps (a bidirectional mask would leave no target)."""
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for images in batches:
        prefix = sample_prefix_len(images.shape[0], num_patches, generator=gen)
        with autocast or contextlib.nullcontext():
            loss = module(images.to(device, non_blocking=True), prefix.to(device))
        total += float(loss) * images.shape[0]
        count += images.shape[0]
    return total / count if count else None


def val_batches(
    val_source: ShardSource | None, model_cfg: AIMConfig, batch_size: int, max_batches: int,
    dist: Dist,
) -> Callable[[], list[torch.Tensor] | Iterator[torch.Tensor]]:
    """A callable giving the held-out batches, the same count on every rank (so collectives
    match), cached in memory when they are small."""
    if val_source is None:
        return list

    def read() -> Iterator[torch.Tensor]:
        return eval_batches(val_source, model_cfg.img_size, batch_size, max_batches,
                            rank=dist.rank, world_size=dist.world_size)

    size = max_batches * batch_size * model_cfg.in_chans * model_cfg.img_size**2 * 4
    cacheable = size <= VAL_CACHE_BYTES
    cache: list[torch.Tensor] = []
    count: list[int] = []

    def batches() -> list[torch.Tensor] | Iterator[torch.Tensor]:
        if not count:
            local = list(read()) if cacheable else None
            n = len(local) if local is not None else sum(1 for _ in read())
            count.append(reduce_min(n, dist))
            cache.extend((local or [])[: count[0]])
        return cache if cacheable else itertools.islice(read(), count[0])

    return batches
