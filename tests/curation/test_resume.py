"""The per-shard work cache: atomic entries, fingerprints that change with their inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aim_kedro.curation.resume import (
    ShardResultCache,
    fingerprint,
    rows_fingerprint,
    tensors_fingerprint,
)
from aim_kedro.datasets import ShardResultCacheDataset


def test_saved_entry_loads_back_without_pickle(tmp_path: Path) -> None:
    cache = ShardResultCache(str(tmp_path / "cache"))
    arrays = {
        "uid": np.array(["a", "bb", "ccc"], dtype=object),
        "score": np.array([0.5, np.nan, -1.0], dtype=np.float32),
        "emb": np.arange(6, dtype=np.float16).reshape(3, 2),
    }
    assert cache.load("stage/fp/shard-000000") is None
    cache.save("stage/fp/shard-000000", arrays)
    loaded = cache.load("stage/fp/shard-000000")
    assert loaded is not None
    assert loaded["uid"].tolist() == ["a", "bb", "ccc"]
    np.testing.assert_array_equal(loaded["score"], arrays["score"])
    assert loaded["emb"].dtype == np.float16 and loaded["emb"].shape == (3, 2)
    assert cache.keys() == ["stage/fp/shard-000000"]
    assert not [p for p in (tmp_path / "cache").rglob(".tmp-*")]


def test_a_half_written_entry_is_never_read(tmp_path: Path) -> None:
    cache = ShardResultCache(str(tmp_path))
    folder = tmp_path / "stage" / "fp"
    folder.mkdir(parents=True)
    (folder / ".tmp-123-abc.npz").write_bytes(b"PK\x03\x04 half a zip")
    (folder / "shard-1.npz").write_bytes(b"PK\x03\x04 cut off by a crash")
    assert cache.keys() == ["stage/fp/shard-1"]
    assert cache.load("stage/fp/shard-1") is None


def test_keys_must_stay_inside_the_cache(tmp_path: Path) -> None:
    cache = ShardResultCache(str(tmp_path))
    for key in ("../escape", "/abs", ""):
        with pytest.raises(ValueError, match="relative path"):
            cache.save(key, {"x": np.zeros(1)})


def test_fingerprints_follow_their_inputs() -> None:
    weights = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    same = {"b": torch.zeros(2), "w": torch.ones(2, 2)}
    nudged = {"w": torch.ones(2, 2), "b": torch.tensor([0.0, 1e-7])}
    assert tensors_fingerprint(weights) == tensors_fingerprint(same)
    assert tensors_fingerprint(weights) != tensors_fingerprint(nudged)
    assert rows_fingerprint([["a", "b"], [1, 2]]) != rows_fingerprint([["b", "a"], [1, 2]])
    assert rows_fingerprint([["a", "b"]]) != rows_fingerprint([["a"], ["b"]])
    assert fingerprint("m", 256) != fingerprint("m", 128)


def test_dataset_loads_a_cache_and_refuses_saves(tmp_path: Path) -> None:
    dataset = ShardResultCacheDataset(filepath=str(tmp_path / "cache"))
    assert dataset.exists()
    cache = dataset.load()
    cache.save("clip_score/abc/shard-000000-def", {"uid": np.array(["x"])})
    assert dataset.preview()["data"] == [["clip_score", "abc", "shard-000000-def"]]
    with pytest.raises(Exception, match="work cache"):
        dataset.save({"shard": 1})
