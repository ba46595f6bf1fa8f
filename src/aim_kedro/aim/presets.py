"""AIM model configurations: one dataclass, the named presets and their training recipes (data,
not code paths).

Where the project and Apple's own code (apple/ml-l3m, ``configs/aimv1/001_aim_v1_600M.yaml``)
differ, both are configuration: the paper presets (``aim_600M`` ... ``aim_7B``) and
``aim_highres`` take ml-l3m's choices, the small presets keep the project's, on which the
sample's figures were measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aim_kedro.common.config import check_keys, from_mapping

ATTN_BACKENDS = ("sdpa", "flex")
HEAD_BLOCKS = ("mlp", "identity_attn")
INITS = ("trunc_normal", "xavier_uniform")
LR_SCALINGS = ("none", "linear")
DEFAULT_NUM_PROBE_LAYERS = 6


def _last_k(depth: int, k: int) -> tuple[int, ...]:
    return tuple(range(max(depth - k, 0), depth))


@dataclass(frozen=True)
class AIMConfig:
    """Every knob of an AIM model (trunk + pixel head); validated on construction.

    `probe_layers` may be given as a sequence of block indices, an int k (the last k blocks) or
    None (the last 6 blocks, or all of them when depth < 6); it is stored as a tuple of ints.

    Pixel head and init (defaults: the project's; ml-l3m's in brackets): `head_pos_embed` adds
    a fixed 2-D sin-cos position embedding after the head's input projection [True];
    `head_bias` gives that projection and the output one biases [True]; `head_block` is "mlp"
    (x + mlp(norm(x))) or "identity_attn" (the trunk's block with an identity for attention:
    x + norm1(x), then x + mlp(norm2(x))) ["identity_attn"]; `init` is "trunc_normal" (std
    0.02 everywhere) or "xavier_uniform" (linears, q/k/v as three projections, the patch conv
    as a linear) ["xavier_uniform"].
    """

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1536
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    head_embed_dim: int = 2048
    head_depth: int = 12
    attn_backend: str = "sdpa"
    probe_layers: tuple[int, ...] | None = field(default=None)
    head_pos_embed: bool = False
    head_bias: bool = False
    head_block: str = "mlp"
    init: str = "trunc_normal"

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "head_embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AIMConfig.{name} must be a positive int, got {value!r}.")
        if isinstance(self.head_depth, bool) or not isinstance(self.head_depth, int) or self.head_depth < 0:
            raise ValueError(f"AIMConfig.head_depth must be an int >= 0, got {self.head_depth!r}.")
        if not self.mlp_ratio > 0:
            raise ValueError(f"AIMConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}.")
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"AIMConfig.img_size ({self.img_size}) must be divisible by patch_size "
                f"({self.patch_size}); choose an img_size that is a multiple of patch_size."
            )
        if self.num_patches < 2:
            raise ValueError(
                f"img_size / patch_size gives {self.num_patches} patch(es); autoregressive "
                "pre-training needs at least 2: lower patch_size or raise img_size."
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"AIMConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads "
                f"({self.num_heads})."
            )
        if self.embed_dim % 4 != 0:
            raise ValueError(
                f"AIMConfig.embed_dim ({self.embed_dim}) must be a multiple of 4 (2-D sin-cos "
                "position embedding)."
            )
        for name, allowed in (("attn_backend", ATTN_BACKENDS), ("head_block", HEAD_BLOCKS),
                              ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"AIMConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}."
                )
        for name in ("head_pos_embed", "head_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AIMConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        object.__setattr__(self, "probe_layers", self._resolve_probe_layers(self.probe_layers))

    def _resolve_probe_layers(self, layers: Any) -> tuple[int, ...]:
        if layers is None:
            return _last_k(self.depth, DEFAULT_NUM_PROBE_LAYERS)
        if isinstance(layers, int) and not isinstance(layers, bool):
            if not 1 <= layers <= self.depth:
                raise ValueError(
                    f"AIMConfig.probe_layers as a count must be in [1, depth={self.depth}], "
                    f"got {layers}."
                )
            return _last_k(self.depth, layers)
        if isinstance(layers, Sequence) and not isinstance(layers, str):
            resolved = tuple(int(i) for i in layers)
            if not resolved:
                raise ValueError("AIMConfig.probe_layers must name at least one block.")
            bad = [i for i in resolved if not 0 <= i < self.depth]
            if bad:
                raise ValueError(
                    f"AIMConfig.probe_layers {bad} out of range for depth {self.depth}: "
                    f"block indices are 0..{self.depth - 1}."
                )
            return resolved
        raise ValueError(
            f"AIMConfig.probe_layers must be None, an int or a list of ints, got {layers!r}."
        )

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image (no class token)."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values per patch (p * p * C): the pixel head's output width."""
        return self.patch_size * self.patch_size * self.in_chans

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict (probe_layers as a list)."""
        out = dataclasses.asdict(self)
        out["probe_layers"] = list(self.probe_layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AIMConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError naming them."""
        return from_mapping(cls, data, "AIMConfig")


# ml-l3m's pixel head (SimpleDecoder: decoder_projection and decoder_pred with biases, the
# decoder's sin-cos position embedding, trunk blocks with GenericIdentity attention) and init
# (xavier-uniform, per q/k/v projection; the patch conv as a linear, as in MAE).
ML_L3M_MODEL: dict[str, Any] = dict(
    head_pos_embed=True, head_bias=True, head_block="identity_attn", init="xavier_uniform"
)
PAPER_PRESETS = ("aim_600M", "aim_1B", "aim_3B", "aim_7B")

_PRESET_ARGS: dict[str, dict[str, Any]] = {
    "aim_600M": dict(embed_dim=1536, depth=24, num_heads=12, probe_layers=tuple(range(14, 20)),
                     **ML_L3M_MODEL),
    "aim_1B": dict(embed_dim=2048, depth=24, num_heads=16, probe_layers=tuple(range(12, 18)),
                   **ML_L3M_MODEL),
    "aim_3B": dict(embed_dim=3072, depth=24, num_heads=24, probe_layers=tuple(range(12, 18)),
                   **ML_L3M_MODEL),
    "aim_7B": dict(embed_dim=4096, depth=32, num_heads=32, probe_layers=tuple(range(14, 20)),
                   **ML_L3M_MODEL),
    # ViT-B trunk with a pixel head of ~6% of the trunk's FLOPs (2 blocks of width 512), so a
    # training step costs <= 1.15x a plain ViT-B step (bench/train_step.py); an 8 x 1024 head
    # would add ~77% of the trunk's FLOPs.
    "aim_vitb": dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
        head_embed_dim=512, head_depth=2,
    ),
    # The sample's head is one block of half the trunk's width. Step cost against a plain ViT
    # on 2 CPU cores (bench/train_step.py --quick, batch 32): 2 x 256 1.95x, 1 x 128 1.17-1.19x,
    # 1 x 64 0.99x.
    "aim_sample": dict(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
        head_embed_dim=64, head_depth=1,
    ),
    # `kedro run -e highres`: the sample at 224 px, patch 16 (196 tokens), with ml-l3m's choices,
    # a trunk small enough to pre-train past the random one on 2 CPU cores within the run's
    # 30 minutes.
    "aim_highres": dict(
        img_size=224, patch_size=16, embed_dim=128, depth=4, num_heads=4,
        head_embed_dim=64, head_depth=1, **ML_L3M_MODEL,
    ),
    "aim_tiny": dict(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
        head_embed_dim=32, head_depth=1,
    ),
}

PRESETS: dict[str, AIMConfig] = {name: AIMConfig(**args) for name, args in _PRESET_ARGS.items()}


@dataclass(frozen=True)
class TrainingRecipe:
    """A preset's learning-rate schedule: what ``pretraining.train`` keys left null take.

    ``lr`` is the peak; ``lr_scaling`` "none" uses it at any batch (ml-l3m: 1e-3 at whatever
    global batch) and "linear" multiplies it by ``batch_size / base_batch_size`` (the linear
    scaling rule). Warm-up lasts ``warmup_steps`` or ``warmup_fraction`` of the run, rising
    linearly from ``warmup_start_lr`` (None: ``peak * (step + 1) / warmup``), then a cosine to 0.
    """

    lr: float
    lr_scaling: str = "none"
    warmup_steps: int | None = None
    warmup_fraction: float | None = None
    warmup_start_lr: float | None = None


# ml-l3m 001_aim_v1_600M.yaml: AdamW lr 1e-3 (not scaled by the batch), a LinearParamScheduler
# from 1e-6 over 2.5% of the iterations, then a CosineParamScheduler to 0.
ML_L3M_RECIPE = TrainingRecipe(lr=1e-3, warmup_fraction=0.025, warmup_start_lr=1e-6)
# What the sample was tuned on (450 steps of batch 64 on 2 cores; README figures).
PROJECT_RECIPE = TrainingRecipe(lr=2e-3, warmup_steps=30)
RECIPES: dict[str, TrainingRecipe] = {
    name: ML_L3M_RECIPE if name in (*PAPER_PRESETS, "aim_highres") else PROJECT_RECIPE
    for name in _PRESET_ARGS
}


def get_config(preset: str, **overrides: Any) -> AIMConfig:
    """The named preset with `overrides` applied, validated.

    Presets that leave probe_layers at its default get it re-derived from an overridden depth.
    """
    if preset not in _PRESET_ARGS:
        raise ValueError(f"Unknown preset={preset!r}; known presets: {sorted(_PRESET_ARGS)}.")
    check_keys(overrides, (f.name for f in dataclasses.fields(AIMConfig)), f"preset {preset!r} override")
    return AIMConfig(**{**_PRESET_ARGS[preset], **overrides})


def config_from_checkpoint(config: Mapping[str, Any]) -> AIMConfig:
    """The ``AIMConfig`` of a checkpoint's ``config`` dict (extra keys such as ``preset`` are
    ignored)."""
    known = {f.name for f in dataclasses.fields(AIMConfig)}
    return AIMConfig.from_dict({k: v for k, v in config.items() if k in known})
