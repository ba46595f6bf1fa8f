"""The five choices where Apple's code (apple/ml-l3m, configs/aimv1/001_aim_v1_600M.yaml) and the
project differed, each checked against a direct definition written here from ml-l3m:

1. pixel head: SimpleDecoder (projection and prediction with biases, a fixed 2-D sin-cos
   position embedding after the projection, trunk blocks with GenericIdentity attention);
2. init: xavier-uniform per q/k/v projection, the patch conv viewed as a linear;
3. warm-up: fvcore's LinearParamScheduler from 1e-6 over 2.5% of the run, then cosine to 0;
4. lr: an absolute 1e-3, whatever the global batch;
5. probes: eval view resize 256 / centre 224; augmented views through the frozen trunk.

The paper presets take these choices; the small presets keep the project's (pinned here too).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from aim_kedro.aim.configs import AimPaperConfig, ProbesConfig
from aim_kedro.aim.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from aim_kedro.aim.features import FrozenTrunk, probe_tokens
from aim_kedro.aim.model import AIM, AIMTrunk, PixelHead
from aim_kedro.aim.presets import PAPER_PRESETS, PRESETS, get_config
from aim_kedro.aim.probe_views import TrunkViews, ViewAugmentation, probe_train_transform
from aim_kedro.aim.train import TrainConfig, lr_at

LN_EPS = 1e-6  # the project's (and the published AIM v1 checkpoints'); ml-l3m trains with 1e-5


def paper_model_config(**overrides):
    """aim_600M's choices at a width a test can build."""
    small = dict(embed_dim=256, num_heads=4, depth=2, head_embed_dim=256, head_depth=2,
                 probe_layers=None)
    return get_config("aim_600M", **{**small, **overrides})


def test_paper_presets_take_ml_l3m_choices_and_the_small_presets_keep_the_project_s():
    for name in (*PAPER_PRESETS, "aim_highres"):
        cfg = PRESETS[name]
        assert (cfg.head_pos_embed, cfg.head_bias, cfg.head_block, cfg.init) == (
            True, True, "identity_attn", "xavier_uniform"), name
        recipe = TrainConfig(preset=name).recipe()
        assert (recipe.lr, recipe.lr_scaling, recipe.warmup_fraction, recipe.warmup_start_lr) == (
            1e-3, "none", 0.025, 1e-6), name
    for name in ("aim_sample", "aim_tiny", "aim_vitb"):
        cfg = PRESETS[name]
        assert (cfg.head_pos_embed, cfg.head_bias, cfg.head_block, cfg.init) == (
            False, False, "mlp", "trunc_normal"), name
    sample = TrainConfig(preset="aim_sample")
    assert (sample.peak_lr(), sample.warmup(), sample.recipe().warmup_start_lr) == (2e-3, 30.0, None)


# --- 1. the pixel head -------------------------------------------------------------------------

def mae_sincos_2d(embed_dim: int, grid: int) -> np.ndarray:
    """ml-l3m's get_2d_sincos_pos_embed (MAE's): width first, then height, [sin, cos] halves."""

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid, dtype=np.float32)
    grid_w = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_axis(embed_dim // 2, mesh[0]), one_axis(embed_dim // 2, mesh[1])],
                          axis=1)


class L3mIdentityBlock(nn.Module):
    """ml-l3m's Block with GenericIdentity attention and use_bias false."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm_1(x)  # x + attn(norm_1(x)) with attn the identity
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm_2(x))))


class L3mSimpleDecoder(nn.Module):
    """ml-l3m's SimpleDecoder as 001_aim_v1_600M.yaml builds it."""

    def __init__(self, input_dim: int, embed_dim: int, depth: int, output_dim: int, grid: int):
        super().__init__()
        self.decoder_projection = nn.Linear(input_dim, embed_dim, bias=True)
        pos = torch.from_numpy(mae_sincos_2d(embed_dim, grid)).float()[None]
        self.register_buffer("decoder_pos_embed", pos)
        self.decoder_blocks = nn.ModuleList(L3mIdentityBlock(embed_dim, 4 * embed_dim)
                                            for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(embed_dim, output_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.decoder_projection(x)
        x = x + self.decoder_pos_embed[:, : x.shape[1]]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))


def _l3m_state(head: PixelHead) -> dict[str, torch.Tensor]:
    """Our head's weights under ml-l3m's names."""
    out = {}
    for name, value in head.state_dict().items():
        name = name.replace("embed.", "decoder_projection.").replace("out.", "decoder_pred.")
        name = name.replace("blocks.", "decoder_blocks.").replace(".norm1.", ".norm_1.")
        name = name.replace(".norm2.", ".norm_2.").replace(".mlp.", ".")
        out[name.replace("norm.", "decoder_norm.") if name.startswith("norm.") else name] = value
    return out


def test_pixel_head_is_ml_l3m_simple_decoder():
    torch.manual_seed(0)
    cfg = paper_model_config(img_size=112)
    head = PixelHead.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so every term is exercised
        for param in head.parameters():
            if param.ndim == 1:
                param.normal_(0.0, 0.3)
    reference = L3mSimpleDecoder(cfg.embed_dim, cfg.head_embed_dim, cfg.head_depth, cfg.patch_dim,
                                 cfg.grid_size).eval()
    reference.load_state_dict({**_l3m_state(head),
                               "decoder_pos_embed": reference.decoder_pos_embed}, strict=True)
    assert head.embed.bias is not None and head.out.bias is not None
    tokens = torch.randn(2, cfg.num_patches, cfg.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(head(tokens), reference(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head.pos_embed, reference.decoder_pos_embed)
        project = PixelHead.from_config(get_config("aim_sample", embed_dim=256, head_embed_dim=256,
                                                   head_depth=2, img_size=112, patch_size=14))
    assert project.pos_embed is None and project.embed.bias is None
    assert [n for n in project.state_dict() if n.startswith("blocks.0.")] == [
        "blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight"]


def test_the_head_position_embedding_tells_positions_apart():
    torch.manual_seed(0)
    cfg = paper_model_config(img_size=56)
    head = PixelHead.from_config(cfg).eval()
    same = torch.randn(1, 1, cfg.embed_dim).expand(1, cfg.num_patches, -1)
    with torch.no_grad():
        out = head(same)
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-3  # equal inputs, positions apart
    with pytest.raises(ValueError, match="position embedding has 16 positions"):
        head(torch.randn(1, 5, cfg.embed_dim))


# --- 2. initialisation -------------------------------------------------------------------------

def _xavier_bound(fan_out: int, fan_in: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def _assert_uniform(weight: torch.Tensor, bound: float, what: str) -> None:
    """xavier-uniform(bound): inside it, reaching it, with a uniform's std (bound / sqrt 3)."""
    weight = weight.detach().flatten()
    assert weight.abs().max() <= bound * (1 + 1e-6), what
    assert weight.abs().max() >= 0.98 * bound, what
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03), what


def test_xavier_init_is_ml_l3m_s():
    torch.manual_seed(0)
    cfg = paper_model_config()
    model = AIM(cfg)
    d = cfg.embed_dim
    expected = {}  # ml-l3m's xavier_uniform_ on every nn.Linear it has, with its fans
    for i, blk in enumerate(model.trunk.blocks):
        for j, part in enumerate("qkv"):  # GenericAttention's q_proj, k_proj, v_proj
            expected[f"trunk.blocks.{i}.attn.{part}_proj"] = (blk.attn.qkv.weight[j * d:(j + 1) * d],
                                                              _xavier_bound(d, d))
        expected[f"trunk.blocks.{i}.attn.proj"] = (blk.attn.proj.weight, _xavier_bound(d, d))
        expected[f"trunk.blocks.{i}.mlp.fc1"] = (blk.mlp.fc1.weight, _xavier_bound(4 * d, d))
        expected[f"trunk.blocks.{i}.mlp.fc2"] = (blk.mlp.fc2.weight, _xavier_bound(d, 4 * d))
    w = cfg.head_embed_dim
    expected["head.decoder_projection"] = (model.head.embed.weight, _xavier_bound(w, d))
    expected["head.decoder_pred"] = (model.head.out.weight, _xavier_bound(cfg.patch_dim, w))
    for i, blk in enumerate(model.head.blocks):
        expected[f"head.{i}.fc1"] = (blk.mlp.fc1.weight, _xavier_bound(4 * w, w))
        expected[f"head.{i}.fc2"] = (blk.mlp.fc2.weight, _xavier_bound(w, 4 * w))
    conv = model.trunk.patch_embed.proj  # MAE: xavier_uniform_(w.view([w.shape[0], -1]))
    expected["patchifier.proj"] = (conv.weight, _xavier_bound(d, cfg.patch_dim))
    for what, (weight, bound) in expected.items():
        _assert_uniform(weight, bound, what)
    fused = _xavier_bound(3 * d, d)  # what initialising qkv as one [3D, D] linear would give
    assert model.trunk.blocks[0].attn.qkv.weight.abs().max() > 1.3 * fused
    # the conv bias keeps nn.Conv2d's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases 0, norms 1/0
    assert conv.bias.abs().max() <= 1 / math.sqrt(cfg.patch_dim) and conv.bias.abs().max() > 0
    assert torch.equal(model.head.embed.bias, torch.zeros_like(model.head.embed.bias))
    assert torch.equal(model.head.out.bias, torch.zeros_like(model.head.out.bias))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


def test_trunc_normal_is_kept_on_request_and_about_twice_xavier_at_the_7b_width():
    torch.manual_seed(0)
    trunk = AIMTrunk(paper_model_config(init="trunc_normal"))
    fc1 = trunk.blocks[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.05)
    width = PRESETS["aim_7B"].embed_dim
    xavier_std = _xavier_bound(4 * width, width) / math.sqrt(3)
    assert 1.9 < 0.02 / xavier_std < 2.1


# --- 3. and 4. the schedule and the learning rate ----------------------------------------------

def l3m_lr(iteration: int, total: int, lr: float = 1e-3) -> float:
    """ml-l3m's lr: step_scheduler(where=iteration / total) of fvcore's CompositeParamScheduler
    [LinearParamScheduler(1e-6, lr), CosineParamScheduler(lr, 0)], lengths [0.025, 0.975],
    interval_scaling rescaled (fvcore moves on once where + 1e-6 passes a length)."""
    where = iteration / total
    if where + 1e-6 > 0.025:
        rescaled = (where - 0.025) / 0.975
        return 0.0 + 0.5 * (lr - 0.0) * (1 + math.cos(math.pi * rescaled))
    rescaled = where / 0.025
    return rescaled * lr + (1 - rescaled) * 1e-6


@pytest.mark.parametrize("total", [400, 450, 1000, 125_000])
def test_paper_schedule_is_ml_l3m_s(total):
    cfg = TrainConfig(preset="aim_600M", batch_size=64, total_steps=total)
    steps = range(total) if total < 5000 else [*range(3200), *range(3200, total, 97), total - 1]
    for step in steps:
        assert lr_at(step, cfg) == pytest.approx(l3m_lr(step, total), rel=1e-9, abs=1e-15), step
    assert lr_at(0, cfg) == pytest.approx(1e-6)


def test_paper_lr_is_absolute_and_linear_scaling_is_selectable():
    for batch in (64, 4096, 256 * 64):  # ml-l3m: lr 1e-3 whatever batch_size_per_gpu x WORLD_SIZE
        assert TrainConfig(preset="aim_600M", batch_size=batch).peak_lr() == 1e-3
        scaled = TrainConfig(preset="aim_600M", batch_size=batch, lr_scaling="linear")
        assert scaled.peak_lr() == pytest.approx(1e-3 * batch / 4096)
    assert TrainConfig(preset="aim_sample", batch_size=4096).peak_lr() == 2e-3
    own = TrainConfig(preset="aim_600M", lr=3e-4, warmup_steps=10, warmup_start_lr=0.0,
                      total_steps=100)
    assert (own.peak_lr(), own.warmup(), lr_at(0, own), lr_at(10, own)) == (3e-4, 10.0, 0.0, 3e-4)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"warmup_steps": 3, "warmup_fraction": 0.1}, "not both"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"lr_scaling": "sqrt"}, "lr_scaling"),
        ({"warmup_start_lr": -1.0}, "warmup_start_lr"),
        ({}, r"warmup_steps \(30 of preset aim_tiny\) gives a warm-up of 30 steps"),
    ],
)
def test_schedule_knobs_are_checked(overrides, match, tiny_train_config):
    with pytest.raises(ValueError, match=match):
        tiny_train_config(**{"warmup_steps": None, **overrides}).validate()


# --- 5. the probe recipe ------------------------------------------------------------------------

def _photo(width: int = 300, height: int = 260) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_paper_eval_view_is_resize_256_centre_224():
    direct = transforms.Compose([  # ml-l3m's eval_transform (crop ratio 0.875)
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    image = _photo()
    torch.testing.assert_close(eval_transform(224, AimPaperConfig().crop_pct)(image), direct(image),
                               atol=0, rtol=0)


def test_paper_recipe_trains_longer_with_weight_decay_and_clipping():
    recipe = AimPaperConfig()
    protocol = recipe.protocol(ProbesConfig(), "cpu")
    for kind in protocol.kinds:
        training = protocol.training_for(kind)
        assert (training.epochs, training.weight_decay, training.grad_clip) == (100, 0.1, 3.0)
    assert protocol.lrs == ProbesConfig().protocol("cpu").lrs
    aug = recipe.augmentation()
    assert aug == ViewAugmentation((0.08, 1.0), True, 0.3, True)


def test_training_views_are_fresh_augmentations_through_the_frozen_trunk():
    torch.manual_seed(0)
    cfg = get_config("aim_tiny")
    frozen = FrozenTrunk(AIMTrunk(cfg), cfg, "tiny")
    images = [_png(_photo(40, 30)), _png(_photo(20, 24))]
    transform = probe_train_transform(cfg.img_size, ViewAugmentation())
    views = TrunkViews(images, torch.tensor([0, 1]), frozen, [0, 1], transform)
    assert views.shape == (2, cfg.num_patches, cfg.embed_dim) and len(views[torch.tensor([1])]) == 1
    first = views.views(torch.Generator().manual_seed(3))
    again = views.views(torch.Generator().manual_seed(3))
    other = views.views(torch.Generator().manual_seed(4))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(seed)  # the same draw by hand: decode, augment, trunk, mean of the layers
    batch = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    torch.testing.assert_close(first, probe_tokens(frozen.trunk, batch, [0, 1]))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
