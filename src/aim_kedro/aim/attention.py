"""Attention backends: timm's Attention (boolean mask through SDPA) plus a FlexAttention path.

The trunk passes either a Bool [B, 1, N, N] mask (backend "sdpa", CPU and GPU) or a flex
`BlockMask` (backend "flex", CUDA only); `AIMAttention` dispatches on the mask's type.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from timm.layers import Attention
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from aim_kedro.aim.masks import may_attend, prefix_causal_mask

AttnMask = torch.Tensor | BlockMask | None


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention, dynamic=False)


def _require_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise RuntimeError(
            f"attn_backend='flex' needs a CUDA device ({what} is on {device.type!r}); "
            "use attn_backend='sdpa' on CPU."
        )


def prefix_causal_mask_mod(prefix_len: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Flex `mask_mod(b, h, q, kv)` with the semantics of `masks.prefix_causal_mask`."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        return may_attend(q_idx, kv_idx, prefix_len[b])

    return mask_mod


def prefix_causal_block_mask(prefix_len: torch.Tensor, num_tokens: int) -> BlockMask:
    """FlexAttention BlockMask for prefix-causal attention (CUDA only)."""
    _require_cuda(prefix_len.device, "prefix_len")
    return create_block_mask(
        prefix_causal_mask_mod(prefix_len),
        B=prefix_len.shape[0],
        H=None,
        Q_LEN=num_tokens,
        KV_LEN=num_tokens,
        device=prefix_len.device,
    )


def build_prefix_causal_mask(
    prefix_len: torch.Tensor, num_tokens: int, backend: str
) -> torch.Tensor | BlockMask:
    """The pre-training attention mask in the form `backend` ("sdpa" | "flex") consumes."""
    if backend == "sdpa":
        return prefix_causal_mask(prefix_len, num_tokens)
    if backend == "flex":
        return prefix_causal_block_mask(prefix_len, num_tokens)
    raise ValueError(f"attn_backend must be 'sdpa' or 'flex', got {backend!r}.")


class AIMAttention(Attention):
    """timm `Attention` (same parameter names: qkv, proj) that also accepts a flex BlockMask."""

    def forward(
        self, x: torch.Tensor, attn_mask: AttnMask = None, is_causal: bool = False
    ) -> torch.Tensor:
        if not isinstance(attn_mask, BlockMask):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        _require_cuda(x.device, "the input")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = _compiled_flex_attention()(q, k, v, block_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        out = self.norm(out)
        out = self.proj(out)
        return self.proj_drop(out)
