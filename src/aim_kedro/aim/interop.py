"""Conversion between aim_kedro models and the published AIM v1 (apple/ml-aim) checkpoint format.

AIM v1 names -> ours: `preprocessor.patchifier.*` -> `trunk.patch_embed.*`, `norm_1`/`norm_2` ->
`norm1`/`norm2`; every other trunk and head name is the same. No tensor needs reshaping (both
use a Conv2d patch projection).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aim_kedro.aim.model import AIM, AIMProbeModel, AIMTrunk, AttentiveProbeHead
from aim_kedro.aim.presets import AIMConfig
from aim_kedro.aim.state_dicts import (  # noqa: F401 - part of this module's API
    STATE_DICT_SUFFIXES,
    read_state_dict,
    state_dict_from_bytes,
)

logger = logging.getLogger(__name__)

_PREFIX_RENAMES = (("preprocessor.patchifier.", "trunk.patch_embed."),)
_BLOCK_RENAMES = ((".norm_1.", ".norm1."), (".norm_2.", ".norm2."))


def _rename(name: str, to_ours: bool) -> str:
    """One AIM v1 name as ours (``to_ours``) or one of ours as AIM v1."""
    for theirs, ours in _PREFIX_RENAMES:
        source, target = (theirs, ours) if to_ours else (ours, theirs)
        if name.startswith(source):
            return target + name[len(source):]
    if name.startswith("trunk.blocks."):
        for theirs, ours in _BLOCK_RENAMES:
            name = name.replace(theirs, ours) if to_ours else name.replace(ours, theirs)
    return name


def _to_ours(name: str) -> str:
    return _rename(name, to_ours=True)


def _to_theirs(name: str) -> str:
    return _rename(name, to_ours=False)


def _resolve_probe_layers(probe_layers: int | Sequence[int], num_blocks: int) -> tuple[int, ...]:
    if isinstance(probe_layers, int) and not isinstance(probe_layers, bool):
        if not 1 <= probe_layers <= num_blocks:
            raise ValueError(
                f"probe_layers={probe_layers} (last k blocks) must be in [1, {num_blocks}]."
            )
        return tuple(range(num_blocks - probe_layers, num_blocks))
    return tuple(int(i) for i in probe_layers)


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(assign=True) with shape and key errors that name the AIM v1 keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"AIM v1 {what} keys do not match the config: missing "
            f"{[_to_theirs(what + '.' + k) for k in missing]}, unexpected "
            f"{[_to_theirs(what + '.' + k) for k in unexpected]}."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"AIM v1 tensor {_to_theirs(what + '.' + key)!r} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[key].shape)}."
            )
    module.load_state_dict(dict(state), strict=True, assign=True)


def from_ml_aim(
    state_dict: Mapping[str, torch.Tensor],
    *,
    img_size: int,
    patch_size: int,
    embed_dim: int,
    num_blocks: int,
    num_heads: int,
    probe_layers: int | Sequence[int],
    num_classes: int,
) -> AIMProbeModel:
    """Build an `AIMProbeModel` from an AIM v1 state dict (the keys of tiny_aim_v1_config.json).

    `probe_layers` is an int k (the last k blocks) or a list of block indices. Tensors are used
    as they are (no copy; meta tensors give a meta model). Without `head.*` keys the attentive
    probe is freshly initialised.
    """
    for name, expected_ndim in (("preprocessor.patchifier.proj.weight", 4),
                                ("trunk.blocks.0.mlp.fc1.weight", 2)):
        if name not in state_dict or state_dict[name].ndim != expected_ndim:
            raise ValueError(f"Not an AIM v1 state dict: no {expected_ndim}-D tensor {name!r}.")
    in_chans = state_dict["preprocessor.patchifier.proj.weight"].shape[1]
    mlp_ratio = state_dict["trunk.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    cfg = AIMConfig(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=int(in_chans),
        embed_dim=embed_dim,
        depth=num_blocks,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        probe_layers=_resolve_probe_layers(probe_layers, num_blocks),
    )
    trunk_state: dict[str, torch.Tensor] = {}
    head_state: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        ours = _to_ours(name)
        if ours.startswith("trunk."):
            trunk_state[ours[len("trunk."):]] = tensor
        elif ours.startswith("head."):
            head_state[ours[len("head."):]] = tensor
        else:
            raise ValueError(f"Unexpected key {name!r} in AIM v1 state dict.")

    with torch.device("meta"):
        trunk = AIMTrunk(cfg)
    _load_checked(trunk, trunk_state, "trunk")
    trunk.reset_pos_embed()
    ref = trunk.patch_embed.proj.weight
    if head_state:
        with torch.device("meta"):
            head = AttentiveProbeHead(embed_dim, num_heads, num_classes)
        _load_checked(head, head_state, "head")
    else:
        logger.info("AIM v1 state dict has no head: initialising a fresh attentive probe.")
        with torch.device(ref.device):
            head = AttentiveProbeHead(embed_dim, num_heads, num_classes)
        head = head.to(dtype=ref.dtype)
    return AIMProbeModel(trunk, cfg.probe_layers, head)


def to_ml_aim(model: AIMProbeModel | AIM | AIMTrunk) -> dict[str, torch.Tensor]:
    """AIM v1 state dict of `model`'s trunk, plus the attentive probe head when it has one
    (an `AIM`'s pixel head is not part of the format and is left out)."""
    if isinstance(model, AIMTrunk):
        trunk, head = model, None
    elif isinstance(model, AIM):
        trunk, head = model.trunk, None
    elif isinstance(model, AIMProbeModel):
        trunk = model.trunk
        head = model.head if isinstance(model.head, AttentiveProbeHead) else None
    else:
        raise TypeError(f"to_ml_aim takes AIMProbeModel, AIM or AIMTrunk, got {type(model)!r}.")
    out = {_to_theirs("trunk." + k): v.detach() for k, v in trunk.state_dict().items()}
    if head is not None:
        out.update({"head." + k: v.detach() for k, v in head.state_dict().items()})
    return out


def load_aim_v1_checkpoint(path: str | Path, **config: Any) -> AIMProbeModel:
    """Read an AIM v1 checkpoint (.safetensors, or .pth/.pt/.bin via torch.load) from a local
    path and build the `AIMProbeModel`; ``config`` holds the keyword arguments of `from_ml_aim`
    (img_size, patch_size, embed_dim, num_blocks, num_heads, probe_layers, num_classes)."""
    return from_ml_aim(read_state_dict(path), **config)
