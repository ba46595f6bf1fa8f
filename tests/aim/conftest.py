"""Shared by the pre-training tests: tiny shards a tiny model can learn, and a tiny TrainConfig."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from aim_kedro.aim.train import TrainConfig
from aim_kedro.io.shards import write_shards


def _smooth_image(rng: np.random.Generator, size: int) -> bytes:
    """A colour gradient with a bright square: structure a tiny model can learn to predict."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = a * xx[..., None] + b * yy[..., None]
    x0, y0 = rng.integers(0, size // 2, 2)
    img[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.uniform(0, 1, 3)
    buf = io.BytesIO()
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tiny_shards(out_dir, n: int = 64, size: int = 20, per_shard: int = 16) -> list[str]:
    """Tiny shards in the curation stage's layout (png + txt + json with uid)."""
    rng = np.random.default_rng(0)
    samples = (
        {"__key__": f"{i:06d}", "png": _smooth_image(rng, size), "txt": f"sample {i}",
         "json": {"uid": f"{i:032x}", "source": "test"}}
        for i in range(n)
    )
    return write_shards(samples, str(out_dir), samples_per_shard=per_shard)


def tiny_config(**overrides) -> TrainConfig:
    base = dict(preset="aim_tiny", batch_size=8, lr=3e-3, warmup_steps=2, total_steps=8,
                num_workers=0, shuffle_buffer=16, checkpoint_every=2, keep_every=4, val_every=4,
                val_batches=2, log_every=1, device="cpu", progress=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def tiny_shards() -> Callable[..., list[str]]:
    """``write_tiny_shards(out_dir, n=64, size=20, per_shard=16)``."""
    return write_tiny_shards


@pytest.fixture
def tiny_train_config() -> Callable[..., TrainConfig]:
    """``tiny_config(**overrides)``: aim_tiny, 8 steps, CPU, checkpoints every 2, keeps every 4."""
    return tiny_config
