"""Pre-training data: transforms, held-out split, mixing, resumable positions, corrupt images."""

from __future__ import annotations

import io
import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from aim_kedro.aim.data import (
    IMAGENET_MEAN,
    ResumableLoader,
    ShardSource,
    ShardStream,
    eval_batches,
    eval_transform,
    in_split,
    mix_sources,
    shuffled,
    split_sources,
    train_transform,
    val_bucket,
)
from aim_kedro.io.shards import write_shards


def _png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _samples(n: int, tag: str = "a", corrupt: tuple[int, ...] = ()):
    for i in range(n):
        image = b"not an image at all" if i in corrupt else _png(i)
        yield {"__key__": f"{tag}{i:05d}", "png": image, "txt": f"caption {i}",
               "json": {"uid": f"{tag}-{i:030d}", "source": tag}}


@pytest.fixture()
def shards(tmp_path):
    return write_shards(_samples(48), str(tmp_path / "a"), samples_per_shard=12)


def test_transforms_shapes_and_normalisation():
    img = Image.new("RGB", (50, 37), (124, 116, 104))
    torch.manual_seed(0)
    x = train_transform(16)(img)
    assert x.shape == (3, 16, 16)
    y = eval_transform(16)(img)
    assert y.shape == (3, 16, 16)
    # a grey equal to the ImageNet mean normalises to ~0
    assert y.abs().max() < 0.02
    assert abs(124 / 255 - IMAGENET_MEAN[0]) < 0.01


def test_val_split_is_deterministic_and_disjoint(shards):
    train, val = split_sources(shards, val_percent=25.0)
    assert val is not None
    uids = [f"x-{i}" for i in range(2000)]
    frac = np.mean([val_bucket(u) < 25.0 for u in uids])
    assert 0.2 < frac < 0.3
    assert [val_bucket(u) for u in uids[:5]] == [val_bucket(u) for u in uids[:5]]
    sample = {"__key__": "k", "json": b'{"uid": "x-1"}'}
    assert in_split(sample, "train", 25.0) != in_split(sample, "val", 25.0)
    n_val = sum(b.shape[0] for b in eval_batches(val, 8, 5))
    n_val_again = sum(b.shape[0] for b in eval_batches(val, 8, 5))
    expected = sum(val_bucket(f"a-{i:030d}") < 25.0 for i in range(48))
    assert n_val == n_val_again == expected


def test_mix_sources_probability_and_resume():
    mixed = list(itertools.islice(mix_sources(itertools.repeat("p"), itertools.repeat("s"), 0.2, 7), 5000))
    share = mixed.count("s") / len(mixed)
    assert 0.17 < share < 0.23
    again = list(itertools.islice(mix_sources(itertools.repeat("p"), itertools.repeat("s"), 0.2, 7), 5000))
    assert mixed == again
    resumed = list(
        itertools.islice(mix_sources(itertools.repeat("p"), itertools.repeat("s"), 0.2, 7, start=100), 50)
    )
    assert resumed == mixed[100:150]
    with pytest.raises(ValueError, match="p must be"):
        next(mix_sources([], [], 1.5, 0))


def test_stream_mixes_secondary_source(tmp_path, shards):
    other = write_shards(_samples(30, tag="b"), str(tmp_path / "b"), samples_per_shard=30)
    source = ShardSource(shards, secondary=ShardSource(other), secondary_p=0.5)
    seen = {"a": 0, "b": 0}
    original = ShardStream._decode

    def spy(self, sample, *args):
        seen[sample["__key__"][0]] += 1
        return original(self, sample, *args)

    stream = ShardStream(source, train_transform(8), 10, seed=1, shuffle_buffer=8)
    stream._decode = spy.__get__(stream)
    batches = list(itertools.islice(iter(stream), 10))
    assert all(b["images"].shape == (10, 3, 8, 8) for b in batches)
    assert seen["a"] > 20 and seen["b"] > 20
    assert "mix" in batches[-1]["state"] and "secondary" in batches[-1]["state"]


def test_loader_resumes_exactly(shards):
    source = ShardSource(shards)
    full = ResumableLoader(source, 8, 5, seed=3, shuffle_buffer=16)
    reference = list(itertools.islice(iter(full), 25))  # crosses epochs (48 samples per epoch)
    first = ResumableLoader(source, 8, 5, seed=3, shuffle_buffer=16)
    head = list(itertools.islice(iter(first), 11))
    state = first.state_dict()
    assert state["batches"] == 11
    second = ResumableLoader(source, 8, 5, seed=3, shuffle_buffer=16, start=state)
    tail = list(itertools.islice(iter(second), 14))
    for a, b in zip(reference, head + tail, strict=True):
        assert torch.equal(a, b)
    other_seed = next(iter(ResumableLoader(source, 8, 5, seed=4, shuffle_buffer=16)))
    assert not torch.equal(other_seed, reference[0])


def test_loader_resumes_exactly_with_workers(shards):
    source = ShardSource(shards)
    kwargs = dict(seed=5, num_workers=2, shuffle_buffer=8)
    reference = list(itertools.islice(iter(ResumableLoader(source, 8, 4, **kwargs)), 9))
    first = ResumableLoader(source, 8, 4, **kwargs)
    head = list(itertools.islice(iter(first), 5))  # odd: the next batch is worker 1's
    tail = list(itertools.islice(iter(ResumableLoader(source, 8, 4, start=first.state_dict(), **kwargs)), 4))
    for a, b in zip(reference, head + tail, strict=True):
        assert torch.equal(a, b)


def test_corrupt_image_is_skipped_and_logged(tmp_path, caplog):
    paths = write_shards(_samples(10, corrupt=(3, 7)), str(tmp_path / "c"), samples_per_shard=10)
    stream = ShardStream(ShardSource(paths), eval_transform(8), 4, train=False)
    with caplog.at_level(logging.WARNING, logger="aim_kedro.aim.data"):
        batches = [b["images"] for b in stream]
    assert sum(b.shape[0] for b in batches) == 8
    assert sum("cannot decode" in r.getMessage() for r in caplog.records) == 2
    assert "a00003" in caplog.text


# webdataset 1.0.2's `shuffle(bufsize, initial=..., seed=...)` over range(n), recorded: the
# project's buffer must give these very sequences, or every default-run figure moves.
WEBDATASET_1_0_2_SHUFFLES = {
    (30, 8, 8, 123): [0, 4, 1, 6, 8, 9, 7, 10, 5, 15, 13, 2, 18, 16, 20, 3, 19, 17, 14, 12, 25,
                      26, 24, 23, 21, 22, 29, 11, 27, 28],
    (25, 1000, 1000, 7): [10, 4, 12, 20, 1, 2, 17, 3, 11, 21, 14, 8, 18, 0, 15, 6, 9, 24, 7, 16,
                          23, 22, 5, 19, 13],
    (40, 5, 2, 0): [1, 2, 0, 4, 8, 6, 9, 7, 10, 11, 14, 3, 16, 15, 13, 17, 5, 21, 18, 23, 24, 19,
                    22, 20, 27, 26, 12, 31, 28, 29, 30, 33, 36, 25, 38, 34, 39, 35, 37, 32],
    (3, 10, 10, 1): [0, 2, 1],
}


@pytest.mark.parametrize("case", sorted(WEBDATASET_1_0_2_SHUFFLES))
def test_shuffle_buffer_gives_webdatasets_sequence(case: tuple[int, int, int, int]) -> None:
    n, bufsize, initial, seed = case
    assert list(shuffled(range(n), bufsize, initial, seed)) == WEBDATASET_1_0_2_SHUFFLES[case]
    assert list(shuffled(iter(range(n)), bufsize, initial, seed)) == WEBDATASET_1_0_2_SHUFFLES[case]
