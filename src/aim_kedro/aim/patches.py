"""The one patchify: images <-> per-patch vectors in AIM's order."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C]; patches row-major over the grid, inside a patch
    (pixel row, pixel column, channel)."""
    if images.ndim != 4:
        raise ValueError(f"patchify expects [B, C, H, W] images, got shape {tuple(images.shape)}.")
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not divisible by patch_size {p}.")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for a square grid: [B, N, p*p*C] -> [B, C, H, W]."""
    b, n, d = patches.shape
    p = patch_size
    g = int(round(n**0.5))
    if g * g != n or d != p * p * channels:
        raise ValueError(
            f"Cannot unpatchify shape {tuple(patches.shape)} with patch_size {p} and "
            f"{channels} channels (needs a square number of patches of {p * p * channels} values)."
        )
    x = patches.reshape(b, g, g, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)
