"""The one prefix-causal mask builder and the prefix-length sampler of AIM pre-training."""

from __future__ import annotations

import torch


def may_attend(q_idx: torch.Tensor, kv_idx: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """AIM's prefix-causal rule: query i may attend key j when j < prefix_len or j <= i.

    Elementwise on broadcastable index tensors; both the dense SDPA mask and the FlexAttention
    ``mask_mod`` are this one rule.
    """
    return (kv_idx < prefix_len) | (kv_idx <= q_idx)


def prefix_causal_mask(prefix_len: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bool [B, 1, N, N], True where query i may attend key j (``may_attend``).

    The boolean convention is the one `F.scaled_dot_product_attention` takes (True = attend).
    """
    if prefix_len.ndim != 1:
        raise ValueError(f"prefix_len must be 1-D [B], got shape {tuple(prefix_len.shape)}.")
    idx = torch.arange(num_tokens, device=prefix_len.device)
    q_idx = idx[None, :, None]  # [1, N_q, 1]
    kv_idx = idx[None, None, :]  # [1, 1, N_k]
    return may_attend(q_idx, kv_idx, prefix_len.to(idx.dtype)[:, None, None]).unsqueeze(1)


def sample_prefix_len(
    batch_size: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Long [B], one prefix length per sample drawn uniformly from [1, N-1]."""
    if num_tokens < 2:
        raise ValueError(f"num_tokens must be >= 2 to leave a target, got {num_tokens}.")
    draw_device = generator.device if generator is not None else device
    s = torch.randint(1, num_tokens, (batch_size,), generator=generator, device=draw_device)
    return s.to(device) if device is not None else s
