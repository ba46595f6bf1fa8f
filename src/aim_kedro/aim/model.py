"""AIM model: a pre-norm ViT trunk (timm blocks), the per-patch pixel head and the probe head.

State-dict names (own format; `interop` converts to/from the published AIM v1 names):
  trunk.patch_embed.proj.{weight,bias}, trunk.patch_embed.norm.{weight,bias},
  trunk.blocks.<i>.{norm1,norm2}.{weight,bias}, trunk.blocks.<i>.attn.{qkv,proj}.weight,
  trunk.blocks.<i>.mlp.{fc1,fc2}.weight, trunk.post_trunk_norm.{weight,bias},
  head.embed.{weight,bias}, head.blocks.<i>.norm.{weight,bias} (head_block "mlp") or
  head.blocks.<i>.{norm1,norm2}.{weight,bias} ("identity_attn"), head.blocks.<i>.mlp.{fc1,fc2}.weight,
  head.norm.{weight,bias}, head.out.{weight,bias} (pixel head, `AIM`; biases with head_bias),
  head.cls_token, head.{k,v,linear}.weight, head.bn.* (attentive probe, `AIMProbeModel`).
Position embeddings (the trunk's, and the head's with head_pos_embed) are fixed, non-persistent
buffers (not in the state dict).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from aim_kedro.aim.attention import AIMAttention, AttnMask, build_prefix_causal_mask
from aim_kedro.aim.loss import aim_pixel_loss
from aim_kedro.aim.presets import INITS, AIMConfig

LN_EPS = 1e-6
INIT_STD = 0.02
LayerNorm = functools.partial(nn.LayerNorm, eps=LN_EPS)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed [N, D] 2-D sin-cos table, tokens row-major over the grid.

    The first D/2 channels encode the column (x) index, the last D/2 the row (y) index; each half
    is [sin, cos] of position * 1/10000^(i/(D/4)), i = 0..D/4-1 (the order the AIM v1 golden
    outputs pin down).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows = pos.repeat_interleave(grid_size)  # y of token t = t // g
    cols = pos.repeat(grid_size)  # x of token t = t % g

    def one_axis(coord: torch.Tensor) -> torch.Tensor:
        out = coord[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def init_weights(module: nn.Module) -> None:
    """timm-style init: trunc-normal(0.02) linears and conv (like a linear), zero biases,
    LayerNorm ones/zeros."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def xavier_init(module: nn.Module) -> None:
    """ml-l3m's init (MAE's, after the JAX ViT): xavier-uniform linears with zero biases, the
    fused qkv as three separate D x D projections, the patch conv's weight viewed as a linear
    [D, C*p*p] (its bias keeps PyTorch's default, as ml-l3m and MAE leave it), LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            init_weights(m)
    for m in module.modules():
        if isinstance(m, AIMAttention):
            for chunk in m.qkv.weight.data.chunk(3, dim=0):
                nn.init.xavier_uniform_(chunk)
        elif isinstance(m, PatchEmbed):
            weight = m.proj.weight.data
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


def initialise(module: nn.Module, style: str) -> None:
    """Initialise every weight of ``module`` in ``style`` (``AIMConfig.init``)."""
    if style == "trunc_normal":
        module.apply(init_weights)
    elif style == "xavier_uniform":
        xavier_init(module)
    else:
        raise ValueError(f"init must be one of {list(INITS)}, got {style!r}.")


class PatchEmbed(nn.Module):
    """Conv2d patch projection (kernel = stride = patch, with bias) followed by a LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class AIMTrunk(nn.Module):
    """Pre-norm ViT without class token, biases in linears, or learned position embedding."""

    def __init__(self, cfg: AIMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size)[None], persistent=False
        )
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=False,
                proj_bias=False,
                norm_layer=LayerNorm,
                mlp_layer=functools.partial(Mlp, bias=False),
                attn_layer=AIMAttention,
            )
            for _ in range(cfg.depth)
        )
        self.post_trunk_norm = LayerNorm(cfg.embed_dim)
        initialise(self, cfg.init)

    def reset_pos_embed(self) -> None:
        """Recompute the fixed position table on the weights' device (after meta-device builds)."""
        device = self.patch_embed.proj.weight.device
        table = sincos_pos_embed_2d(self.cfg.embed_dim, self.cfg.grid_size)[None]
        self.pos_embed = table.to(device)

    def build_attn_mask(self, prefix_len: torch.Tensor) -> AttnMask:
        """Prefix-causal mask in the form this trunk's attn_backend consumes."""
        return build_prefix_causal_mask(prefix_len, self.cfg.num_patches, self.cfg.attn_backend)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, D] with the position embedding added."""
        expected = (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"AIMTrunk expects images of shape [B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}], got {tuple(images.shape)}."
            )
        x = self.patch_embed(images)
        return x + self.pos_embed.to(x.dtype)

    def _block(self, blk: nn.Module, x: torch.Tensor, attn_mask: AttnMask) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, attn_mask, use_reentrant=False)
        return blk(x, attn_mask)

    def _resolve_indices(self, indices: int | Sequence[int]) -> list[int]:
        depth = self.cfg.depth
        if isinstance(indices, int):
            if not 1 <= indices <= depth:
                raise ValueError(f"indices as a count must be in [1, {depth}], got {indices}.")
            return list(range(depth - indices, depth))
        out = [i + depth if i < 0 else i for i in indices]
        bad = [i for i, j in zip(indices, out, strict=True) if not 0 <= j < depth]
        if bad or not out:
            raise ValueError(f"Block indices {list(indices)} invalid for depth {depth}.")
        return out

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int],
        attn_mask: AttnMask = None,
    ) -> list[torch.Tensor]:
        """Raw outputs [B, N, D] of the blocks in `indices` (an int k = the last k blocks), in
        that order; bidirectional attention when attn_mask is None."""
        wanted = self._resolve_indices(indices)
        last = max(wanted)
        x = self.embed(images)
        outputs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = self._block(blk, x, attn_mask)
            outputs[i] = x
        return [outputs[i] for i in wanted]

    def forward_features(self, images: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """All blocks then post_trunk_norm: [B, N, D]."""
        x = self.embed(images)
        for blk in self.blocks:
            x = self._block(blk, x, attn_mask)
        return self.post_trunk_norm(x)

    def forward(self, images: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """Same as `forward_features`."""
        return self.forward_features(images, attn_mask)


class HeadBlock(nn.Module):
    """Pre-norm residual MLP block (a transformer block without attention)."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class IdentityAttnBlock(nn.Module):
    """ml-l3m's head block: the trunk's pre-norm block with an identity in place of attention,
    so ``x + norm1(x)``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(x)
        return x + self.mlp(self.norm2(x))


HEAD_BLOCK_TYPES: dict[str, type[nn.Module]] = {"mlp": HeadBlock, "identity_attn": IdentityAttnBlock}


class PixelHead(nn.Module):
    """Per-patch MLP head: linear D -> W (+ a fixed sin-cos position embedding over a
    ``pos_embed_grid`` side grid when given), `depth` blocks, LayerNorm, linear W -> p*p*C.

    ``block``, ``bias`` and ``init`` are ``AIMConfig.head_block``, ``head_bias`` and ``init``.
    """

    def __init__(
        self, in_dim: int, embed_dim: int, depth: int, out_dim: int, mlp_ratio: float = 4.0,
        *, block: str = "mlp", bias: bool = False, pos_embed_grid: int | None = None,
        init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if block not in HEAD_BLOCK_TYPES:
            raise ValueError(f"head block must be one of {list(HEAD_BLOCK_TYPES)}, got {block!r}.")
        self.grad_checkpointing = False
        self.embed = nn.Linear(in_dim, embed_dim, bias=bias)
        table = None if pos_embed_grid is None else sincos_pos_embed_2d(embed_dim, pos_embed_grid)[None]
        self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList(
            HEAD_BLOCK_TYPES[block](embed_dim, mlp_ratio) for _ in range(depth)
        )
        self.norm = LayerNorm(embed_dim)
        self.out = nn.Linear(embed_dim, out_dim, bias=bias)
        initialise(self, init)

    @classmethod
    def from_config(cls, cfg: AIMConfig) -> PixelHead:
        """The pixel head an ``AIM`` of ``cfg`` has."""
        return cls(
            cfg.embed_dim, cfg.head_embed_dim, cfg.head_depth, cfg.patch_dim, cfg.mlp_ratio,
            block=cfg.head_block, bias=cfg.head_bias, init=cfg.init,
            pos_embed_grid=cfg.grid_size if cfg.head_pos_embed else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.pos_embed is not None:
            if x.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(
                    f"PixelHead's position embedding has {self.pos_embed.shape[1]} positions, "
                    f"the input {x.shape[1]} tokens."
                )
            x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.out(self.norm(x))


class AIM(nn.Module):
    """Pre-training model: prefix-causal trunk + pixel head; `loss` is AIM's objective."""

    def __init__(self, cfg: AIMConfig, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = AIMTrunk(cfg)
        self.head = PixelHead.from_config(cfg)
        self.grad_checkpointing = grad_checkpointing

    @property
    def grad_checkpointing(self) -> bool:
        """Activation checkpointing per trunk and head block (saves memory, costs a recompute)."""
        return self.trunk.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.trunk.grad_checkpointing = bool(enable)
        self.head.grad_checkpointing = bool(enable)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm-style switch for activation checkpointing."""
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        """Per-position patch predictions [B, N, p*p*C] under the prefix-causal mask."""
        mask = self.trunk.build_attn_mask(prefix_len.to(images.device))
        return self.head(self.trunk.forward_features(images, mask))

    def loss(self, images: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        """Scalar pixel loss of `forward(images, prefix_len)`."""
        pred = self(images, prefix_len)
        return aim_pixel_loss(pred, images, prefix_len.to(images.device), self.cfg.patch_size)


class AttentiveProbeHead(nn.Module):
    """AIM v1 attentive probe: affine-free BatchNorm over tokens, one learned query (used as q
    directly), k/v projections, multi-head attention, linear classifier; no biases."""

    def __init__(self, embed_dim: int, num_heads: int, num_classes: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(embed_dim, affine=False, eps=LN_EPS)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.k = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v = nn.Linear(embed_dim, embed_dim, bias=False)
        self.linear = nn.Linear(embed_dim, num_classes, bias=False)
        self.apply(init_weights)
        trunc_normal_(self.cls_token, std=INIT_STD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] -> logits [B, num_classes]."""
        b, n, d = tokens.shape
        h = self.num_heads
        x = self.bn(tokens.transpose(1, 2)).transpose(1, 2)
        q = self.cls_token.expand(b, -1, -1).reshape(b, 1, h, d // h).transpose(1, 2)
        k = self.k(x).reshape(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, d // h).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)
        return self.linear(pooled)


class AIMProbeModel(nn.Module):
    """Frozen-trunk evaluation model: mean of the raw probe-layer outputs -> attentive probe."""

    def __init__(self, trunk: AIMTrunk, probe_layers: Sequence[int], head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.probe_layers = tuple(trunk._resolve_indices(list(probe_layers)))
        self.head = head

    def probe_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the raw (pre-norm) outputs of the probe layers: [B, N, D]."""
        feats = self.trunk.forward_intermediates(x, self.probe_layers)
        return torch.stack(feats, dim=0).mean(dim=0)

    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw outputs [B, N, D] of every trunk block, bidirectional attention."""
        return self.trunk.forward_intermediates(x, list(range(self.trunk.cfg.depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits."""
        return self.head(self.probe_features(x))
