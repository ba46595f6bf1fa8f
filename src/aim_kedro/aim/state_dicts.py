"""Reading a checkpoint file's tensors (safetensors, or torch.load of a .pth), without the model
code: the catalog's checkpoint datasets read files this way, and building the catalog then
imports neither the model nor timm."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _check_suffix(suffix: str, where: str | Path) -> None:
    if suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(
            f"Unsupported checkpoint suffix {suffix!r} for {where}: use .safetensors or .pth."
        )


def _unwrap(state: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint file: ``.safetensors`` (memory-mapped), or
    ``.pth``/``.pt``/``.bin`` through ``torch.load`` (weights only; a ``model`` or
    ``state_dict`` wrapper is unwrapped)."""
    path = Path(path)
    _check_suffix(path.suffix, path)
    if not path.is_file():
        raise FileNotFoundError(f"AIM v1 checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True))


def state_dict_from_bytes(data: bytes, suffix: str) -> dict[str, torch.Tensor]:
    """:func:`read_state_dict` for a file's bytes (a checkpoint read from remote storage)."""
    _check_suffix(suffix, "bytes")
    if suffix == ".safetensors":
        return load_safetensors_bytes(data)
    return _unwrap(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


__all__ = ["STATE_DICT_SUFFIXES", "read_state_dict", "state_dict_from_bytes"]
