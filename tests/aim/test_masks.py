"""Prefix-causal mask semantics and the prefix-length sampler."""

import torch

from aim_kedro.aim.attention import prefix_causal_mask_mod
from aim_kedro.aim.masks import prefix_causal_mask, sample_prefix_len


def test_mask_shape_and_dtype():
    mask = prefix_causal_mask(torch.tensor([1, 3]), 5)
    assert mask.shape == (2, 1, 5, 5)
    assert mask.dtype == torch.bool


def test_mask_hand_checked_prefix_two_of_four():
    mask = prefix_causal_mask(torch.tensor([2]), 4)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0],  # query 0 sees the whole prefix (keys 0, 1)
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)


def test_mask_prefix_one_is_plain_causal():
    mask = prefix_causal_mask(torch.tensor([1]), 5)[0, 0]
    assert torch.equal(mask, torch.ones(5, 5, dtype=torch.bool).tril())


def test_mask_full_prefix_is_bidirectional():
    mask = prefix_causal_mask(torch.tensor([6]), 6)[0, 0]
    assert mask.all()


def test_mask_property_over_random_prefix_lengths():
    gen = torch.Generator().manual_seed(0)
    n = 9
    prefix_len = sample_prefix_len(64, n, generator=gen)
    mask = prefix_causal_mask(prefix_len, n)
    for b, s in enumerate(prefix_len.tolist()):
        for i in range(n):
            for j in range(n):
                assert bool(mask[b, 0, i, j]) == (j < s or j <= i), (b, s, i, j)


def test_flex_mask_mod_matches_dense_mask():
    prefix_len = torch.tensor([1, 3, 7])
    n = 8
    b = torch.arange(3)[:, None, None]
    q = torch.arange(n)[None, :, None]
    kv = torch.arange(n)[None, None, :]
    dense = prefix_causal_mask_mod(prefix_len)(b, torch.zeros(1, dtype=torch.long), q, kv)
    assert torch.equal(dense, prefix_causal_mask(prefix_len, n)[:, 0])


def test_sample_prefix_len_range_and_coverage():
    gen = torch.Generator().manual_seed(1)
    s = sample_prefix_len(5000, 6, generator=gen)
    assert s.dtype == torch.long and s.shape == (5000,)
    assert set(s.tolist()) == {1, 2, 3, 4, 5}
    counts = torch.bincount(s, minlength=6)[1:].float()
    assert (counts / counts.sum() - 0.2).abs().max() < 0.03


def test_sample_prefix_len_is_reproducible_and_rejects_one_token():
    a = sample_prefix_len(10, 16, generator=torch.Generator().manual_seed(3))
    b = sample_prefix_len(10, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    try:
        sample_prefix_len(2, 1)
    except ValueError as err:
        assert "num_tokens" in str(err)
    else:
        raise AssertionError("expected ValueError")
