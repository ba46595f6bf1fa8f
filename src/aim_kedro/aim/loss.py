"""AIM's pixel loss: next-patch regression on per-patch standardised targets."""

from __future__ import annotations

import torch

from aim_kedro.aim.patches import patchify

TARGET_EPS = 1e-6


def patch_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, N, p*p*C] float32 targets: each patch standardised by its own mean and unbiased var."""
    x = patchify(images.float(), patch_size)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=True, keepdim=True)
    return (x - mean) / torch.sqrt(var + TARGET_EPS)


def aim_pixel_loss(
    pred: torch.Tensor, images: torch.Tensor, prefix_len: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Scalar MSE: output i predicts patch i+1; mean over a patch's values, then over every
    non-prefix target (target index j >= prefix_len[b]) of the batch. Computed in float32.

    A batch with no target at all (every prefix_len >= N) gives 0.
    """
    target = patch_targets(images, patch_size)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred shape {tuple(pred.shape)} does not match patch targets {tuple(target.shape)}."
        )
    n = target.shape[1]
    err = (pred[:, :-1].float() - target[:, 1:]).pow(2).mean(dim=-1)  # [B, N-1], target j = 1..N-1
    j = torch.arange(1, n, device=target.device)
    keep = j[None, :] >= prefix_len.to(target.device)[:, None]
    total = torch.where(keep, err, torch.zeros_like(err)).sum()
    return total / keep.sum().clamp_min(1)
