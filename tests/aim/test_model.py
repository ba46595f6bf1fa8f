"""AIM trunk, pixel head, probe model: shapes, prefix-causality, gradients, backends, init."""

import pytest
import torch
from torch import nn

from aim_kedro.aim.loss import aim_pixel_loss
from aim_kedro.aim.masks import prefix_causal_mask
from aim_kedro.aim.model import AIM, AIMProbeModel, AIMTrunk, AttentiveProbeHead, PixelHead
from aim_kedro.aim.presets import get_config


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = get_config("aim_tiny")
    return cfg, AIM(cfg).eval()


def _perturb_patch(images, index, patch_size, grid):
    r, c = divmod(index, grid)
    out = images.clone()
    p = patch_size
    out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += torch.randn_like(
        out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]
    )
    return out


def test_forward_shapes_and_loss(tiny):
    cfg, model = tiny
    images = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    prefix_len = torch.tensor([1, 5, 15])
    pred = model(images, prefix_len)
    assert pred.shape == (3, cfg.num_patches, cfg.patch_size**2 * 3)
    loss = model.loss(images, prefix_len)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.allclose(loss, aim_pixel_loss(pred, images, prefix_len, cfg.patch_size))


def test_wrong_image_size_raises(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(1, 3, 20, 20), torch.tensor([1]))


def test_later_patch_does_not_affect_earlier_outputs(tiny):
    cfg, model = tiny
    torch.manual_seed(1)
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    prefix_len = torch.tensor([5, 5])
    k = 9  # beyond the prefix
    with torch.no_grad():
        base = model(images, prefix_len)
        moved = model(_perturb_patch(images, k, cfg.patch_size, cfg.grid_size), prefix_len)
    torch.testing.assert_close(moved[:, :k], base[:, :k], atol=1e-6, rtol=0)
    assert (moved[:, k:] - base[:, k:]).abs().amax(dim=-1).min() > 1e-4


def test_prefix_patch_affects_every_output(tiny):
    cfg, model = tiny
    torch.manual_seed(2)
    images = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    prefix_len = torch.tensor([5])
    with torch.no_grad():
        base = model(images, prefix_len)
        moved = model(_perturb_patch(images, 4, cfg.patch_size, cfg.grid_size), prefix_len)
    assert (moved - base).abs().amax(dim=-1).min() > 1e-4


def test_bidirectional_without_mask(tiny):
    cfg, model = tiny
    torch.manual_seed(3)
    images = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    last = cfg.num_patches - 1
    with torch.no_grad():
        base = model.trunk.forward_features(images)
        moved = model.trunk.forward_features(
            _perturb_patch(images, last, cfg.patch_size, cfg.grid_size)
        )
    assert (moved[:, 0] - base[:, 0]).abs().max() > 1e-4


def test_intermediates_are_raw_block_outputs(tiny):
    cfg, model = tiny
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    mask = prefix_causal_mask(torch.tensor([3, 7]), cfg.num_patches)
    with torch.no_grad():
        inter = model.trunk.forward_intermediates(images, [1, 0], attn_mask=mask)
        feats = model.trunk.forward_features(images, attn_mask=mask)
        last = model.trunk.forward_intermediates(images, 1)
    assert [t.shape for t in inter] == [(2, cfg.num_patches, cfg.embed_dim)] * 2
    torch.testing.assert_close(model.trunk.post_trunk_norm(inter[0]), feats)
    assert not torch.allclose(inter[0], feats)
    assert len(last) == 1 and not torch.allclose(last[0], inter[0])


def test_gradients_reach_every_parameter(tiny):
    cfg, model = tiny
    model.train()
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    model.loss(images, torch.tensor([2, 9])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_grad_checkpointing_matches_plain(tiny):
    cfg, model = tiny
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    prefix_len = torch.tensor([3, 11])
    loss = model.loss(images, prefix_len)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ckpt = AIM(cfg, grad_checkpointing=True).eval()
    ckpt.load_state_dict(model.state_dict())
    assert ckpt.grad_checkpointing and ckpt.trunk.grad_checkpointing and ckpt.head.grad_checkpointing
    loss2 = ckpt.loss(images, prefix_len)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    for n, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_architecture_facts_and_init():
    torch.manual_seed(0)
    cfg = get_config("aim_sample")
    model = AIM(cfg)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert all(m.eps == 1e-6 for m in norms)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    conv = model.trunk.patch_embed.proj
    assert conv.bias is not None and torch.equal(conv.bias, torch.zeros_like(conv.bias))
    fc1 = model.trunk.blocks[0].mlp.fc1.weight
    assert abs(fc1.std().item() - 0.02) < 0.002 and fc1.abs().max() < 0.2
    assert "trunk.pos_embed" not in dict(model.named_parameters())
    assert "trunk.pos_embed" not in model.state_dict()
    assert model.trunk.pos_embed.shape == (1, cfg.num_patches, cfg.embed_dim)
    assert len(model.head.blocks) == cfg.head_depth
    assert model.head.embed.weight.shape == (cfg.head_embed_dim, cfg.embed_dim)
    assert model.head.out.weight.shape == (cfg.patch_dim, cfg.head_embed_dim)
    trunk_params = sum(p.numel() for p in model.trunk.parameters())
    assert 0.7e6 < trunk_params < 0.9e6


def test_pixel_head_is_per_patch():
    torch.manual_seed(0)
    head = PixelHead(8, 16, 2, 12).eval()
    x = torch.randn(1, 5, 8)
    y = head(x)
    x2 = x.clone()
    x2[:, 3] += 1.0
    y2 = head(x2)
    torch.testing.assert_close(y2[:, [0, 1, 2, 4]], y[:, [0, 1, 2, 4]])
    assert y.shape == (1, 5, 12)


def test_probe_model_features_and_logits():
    torch.manual_seed(0)
    cfg = get_config("aim_sample")
    trunk = AIMTrunk(cfg).eval()
    probe = AIMProbeModel(trunk, (1, 3), AttentiveProbeHead(cfg.embed_dim, cfg.num_heads, 10))
    probe.eval()
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        feats = probe.extract_features(images)
        pooled = probe.probe_features(images)
        logits = probe(images)
    assert len(feats) == cfg.depth
    torch.testing.assert_close(pooled, (feats[1] + feats[3]) / 2)
    assert logits.shape == (2, 10)
    with pytest.raises(ValueError):
        AIMProbeModel(trunk, (0, 9), AttentiveProbeHead(cfg.embed_dim, cfg.num_heads, 10))


def test_flex_backend_needs_cuda_on_cpu():
    model = AIM(get_config("aim_tiny", attn_backend="flex"))
    with pytest.raises(RuntimeError, match="CUDA"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([3]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention needs CUDA")
def test_flex_matches_sdpa_on_cuda():
    torch.manual_seed(0)
    cfg = get_config("aim_sample")
    sdpa = AIM(cfg).cuda().eval()
    flex = AIM(get_config("aim_sample", attn_backend="flex")).cuda().eval()
    flex.load_state_dict(sdpa.state_dict())
    images = torch.randn(4, 3, cfg.img_size, cfg.img_size, device="cuda")
    prefix_len = torch.tensor([1, 7, 33, 63], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(flex(images, prefix_len), sdpa(images, prefix_len),
                                   atol=2e-4, rtol=2e-4)
    loss = flex.loss(images, prefix_len)
    loss.backward()
    assert all(p.grad is not None for p in flex.parameters())
