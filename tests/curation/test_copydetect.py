"""The copy-detection descriptor: SSCD-style training on pool images, a pretrained TorchScript
descriptor by path, the candidate search (exact and ANN), and the per-shard descriptor pass."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from conftest import scene_picture

from aim_kedro.curation.copy_augment import augment, text_masks
from aim_kedro.curation.copydetect import (
    DescriptorConfig,
    info_nce,
    load_describer,
    to_tensor,
    train_copy_detector,
)
from aim_kedro.curation.describe import aligned_descriptors, describe_index
from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.curation.matching import CandidateConfig, knn_pairs
from aim_kedro.io.shards import ShardSet, write_shards

TINY = DescriptorConfig(image_size=32, dim=16, widths=(8, 16), steps=3, batch_size=8,
                        train_images=16)


def _images(n: int, size: int = 32) -> torch.Tensor:
    return to_tensor([scene_picture(seed, 96) for seed in range(n)], size)


def test_training_gives_a_checkpoint_whose_describer_normalises() -> None:
    checkpoint = train_copy_detector(_images(12), TINY, progress=False)
    meta = checkpoint["metadata"]
    assert meta["images"] == 12 and meta["steps"] == 3 and np.isfinite(meta["final_loss"])
    again = train_copy_detector(_images(12), TINY, progress=False)
    assert all(torch.equal(v, again["state_dict"][k]) for k, v in checkpoint["state_dict"].items())
    describer = load_describer(TINY, checkpoint)
    out = describer.describe([scene_picture(s, 80) for s in range(5)])
    assert out.shape == (5, 16) and out.dtype == np.float16
    assert np.allclose(np.linalg.norm(out.astype(np.float32), axis=1), 1.0, atol=1e-2)
    with pytest.raises(ValueError, match="at least 2 decodable"):
        train_copy_detector(_images(1), TINY, progress=False)
    with pytest.raises(ValueError, match="copy_detector checkpoint is empty"):
        load_describer(TINY, {"config": {}, "state_dict": {}})


def test_augment_keeps_shape_and_range_and_info_nce_prefers_matching_views() -> None:
    x = _images(6).float().div(255)
    g = torch.Generator().manual_seed(0)
    out = augment(x, text_masks(32, 4, np.random.default_rng(0)), g)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert info_nce(z, z, 0.1) < info_nce(z, z.roll(1, 0), 0.1)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: SSCD ships TorchScript
def test_a_torchscript_descriptor_is_used_by_path(tmp_path) -> None:
    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 4)

    path = tmp_path / "descriptor.pt"
    torch.jit.script(Mean()).save(str(path))
    cfg = DescriptorConfig(path=str(path), image_size=32)
    assert not cfg.trains
    describer = load_describer(cfg, None)
    assert describer.dim == 12 and describer.name == "descriptor.pt"
    assert describer.describe([scene_picture(0, 40)]).shape == (1, 12)
    with pytest.raises(FileNotFoundError, match=r"curation\.dedup\.descriptor\.path"):
        load_describer(DescriptorConfig(path=str(tmp_path / "missing.pt")), None)


def test_descriptor_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"descriptor\.image_size must be a multiple of 8"):
        DescriptorConfig(image_size=36, widths=(8, 16))
    with pytest.raises(ValueError, match=r"descriptor\.widths"):
        DescriptorConfig(widths=(8,))
    with pytest.raises(ValueError, match=r"descriptor\.device"):
        DescriptorConfig(device="tpu")
    with pytest.raises(ValueError, match=r"candidates\.background_rank"):
        CandidateConfig(k=3, background_rank=5)
    with pytest.raises(ValueError, match=r"candidates\.ann"):
        CandidateConfig(ann="lsh")


@pytest.mark.parametrize("index", ["exact", "ivf", "hnsw"])
def test_knn_pairs_find_planted_copies_exactly_and_with_ann(index: str) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 32)).astype(np.float32)
    planted = rng.choice(3000, 30, replace=False)
    copies = base[planted] + rng.normal(scale=0.05, size=(30, 32)).astype(np.float32)
    x = np.concatenate([base, copies])
    cfg = CandidateConfig(k=5, background_rank=5, min_similarity=0.9, margin=0.05,
                          exact_below=10**9 if index == "exact" else 0,
                          ann="hnsw" if index == "hnsw" else "ivf", nprobe=8)
    i, j, sim = knn_pairs(x, cfg)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    expected = {(int(p), 3000 + k) for k, p in enumerate(planted)}
    assert len(expected & found) >= 29 and len(found - expected) <= 3
    assert (i < j).all() and (sim >= 0.9).all()
    # against another set: the copies find their originals
    i, j, _ = knn_pairs(copies, cfg, base)
    across = set(zip(i.tolist(), j.tolist(), strict=True))
    assert sum((k, int(p)) in across for k, p in enumerate(planted)) >= 29


def test_describe_index_runs_per_shard_and_aligns(tmp_path) -> None:
    samples = [{"__key__": f"k{i}", "png": _png(i), "txt": "a caption", "json": {"uid": f"u{i}"}}
               for i in range(5)]
    samples.append({"__key__": "bad", "png": b"not an image", "txt": "x", "json": {"uid": "bad"}})
    write_shards(samples, str(tmp_path / "pool"), samples_per_shard=2)
    shards = ShardSet.open(str(tmp_path / "pool"))
    index, _ = build_index(shards, IndexConfig(), progress=False)
    checkpoint = train_copy_detector(_images(8), TINY, progress=False)
    table, summary = describe_index(lambda: load_describer(TINY, checkpoint), shards,
                                    index.filter(pl.col("phash").is_not_null()), IndexConfig(),
                                    32, batch_size=2, progress=False)
    assert summary["described"] == 5 == table.height and summary["dim"] == 16
    aligned = aligned_descriptors(pl.Series(["u3", "bad", "u0"]), table)
    assert aligned.shape == (3, 16) and not aligned[1].any() and aligned[0].any()
    direct = load_describer(TINY, checkpoint).describe([scene_picture(3, 64)])[0]
    assert np.allclose(aligned[0], direct, atol=2e-3)


def _png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    scene_picture(seed, 64).save(buffer, "PNG")
    return buffer.getvalue()
