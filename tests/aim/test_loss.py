"""AIM pixel loss against a direct loop, and patchify layout."""

import pytest
import torch

from aim_kedro.aim.loss import aim_pixel_loss
from aim_kedro.aim.patches import patchify, unpatchify


def _loop_loss(pred, images, prefix_len, p):
    b_size, c, h, w = images.shape
    g = h // p
    total, count = 0.0, 0
    for b in range(b_size):
        for j in range(1, g * g):
            if j < int(prefix_len[b]):
                continue
            r, col = divmod(j, g)
            patch = images[b, :, r * p:(r + 1) * p, col * p:(col + 1) * p]  # [C, p, p]
            values = patch.permute(1, 2, 0).reshape(-1).double()  # pixel row, pixel col, channel
            mean = values.mean()
            var = ((values - mean) ** 2).sum() / (values.numel() - 1)
            target = (values - mean) / torch.sqrt(var + 1e-6)
            total += ((pred[b, j - 1].double() - target) ** 2).mean().item()
            count += 1
    return total / count


def test_patchify_order_is_row_col_channel():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    # patch 1 = grid row 0, grid column 1; first value = pixel (0, 2), channel 0
    expected = images[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1], expected)
    assert torch.equal(unpatchify(patches, 2, 3), images)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_direct_loop(seed):
    torch.manual_seed(seed)
    p, b = 4, 3
    images = torch.randn(b, 3, 12, 12)
    n = 9
    pred = torch.randn(b, n, p * p * 3)
    prefix_len = torch.randint(1, n, (b,))
    got = aim_pixel_loss(pred, images, prefix_len, p)
    assert got.ndim == 0
    assert got.item() == pytest.approx(_loop_loss(pred, images, prefix_len, p), rel=1e-5)


def test_loss_ignores_prefix_targets_and_last_prediction():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48)
    prefix_len = torch.tensor([2, 3])
    base = aim_pixel_loss(pred, images, prefix_len, 4)
    changed = pred.clone()
    changed[0, 0] += 10.0  # predicts target 1 < prefix 2: no loss
    changed[1, :2] += 10.0  # predict targets 1, 2 < prefix 3: no loss
    changed[:, 3] += 10.0  # last position has no target
    assert torch.equal(aim_pixel_loss(changed, images, prefix_len, 4), base)
    changed[0, 1] += 1.0  # predicts target 2 >= prefix 2: counts
    assert aim_pixel_loss(changed, images, prefix_len, 4) > base


def test_perfect_prediction_gives_zero_and_shape_mismatch_raises():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 8, 8)
    patches = patchify(images, 4)
    target = (patches - patches.mean(-1, keepdim=True)) / torch.sqrt(
        patches.var(-1, keepdim=True) + 1e-6
    )
    pred = torch.cat([target[:, 1:], torch.zeros(1, 1, 48)], dim=1)
    assert aim_pixel_loss(pred, images, torch.tensor([1]), 4).item() == pytest.approx(0, abs=1e-10)
    with pytest.raises(ValueError, match="shape"):
        aim_pixel_loss(pred[:, :3], images, torch.tensor([1]), 4)
