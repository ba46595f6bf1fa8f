"""Tests of the DFN-style filtering network (open_clip CLIP trained from scratch)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from aim_kedro.curation.clip_models import load_clip_model
from aim_kedro.curation.filter_network import (
    FilterNetworkConfig,
    roc_auc,
    train_filter_network,
    wrong_caption_auc,
)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten digit {}", "the number {} written by hand")
PHOTOS = {
    "chelsea": ("a photo of a cat", "a tabby cat"),
    "coffee": ("a cup of coffee", "a coffee cup on a saucer"),
    "rocket": ("a rocket on a launch pad", "a space rocket"),
    "coins": ("old coins", "a photo of coins"),
    "astronaut": ("an astronaut", "a portrait of an astronaut"),
    "camera": ("a man with a camera", "a photographer"),
    "hubble_deep_field": ("galaxies in deep space", "a telescope image of galaxies"),
    "moon": ("the surface of the moon", "moon craters"),
    "immunohistochemistry": ("stained tissue under a microscope", "a microscopy image"),
    "brick": ("a brick wall", "bricks"),
}


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, quality=90) if fmt == "JPEG" else Image.fromarray(
        array
    ).save(buf, format=fmt)
    return buf.getvalue()


def digit_photo_pairs(n: int, seed: int, size: int = 64) -> list[tuple[bytes, str, str]]:
    """Real images with true captions and a class: coloured sklearn digits, skimage photo crops."""
    from skimage import data as skdata
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    photos = {}
    for name in PHOTOS:
        im = getattr(skdata, name)()
        photos[name] = np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3]
    pairs = []
    for _ in range(n):
        if rng.random() < 0.6:
            i = int(rng.integers(len(digits.images)))
            glyph = Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8))
            glyph = np.asarray(glyph.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
            fg, bg = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
            rgb = (glyph[..., None] * fg + (1 - glyph[..., None]) * bg) * 255
            template = DIGIT_TEMPLATES[int(rng.integers(len(DIGIT_TEMPLATES)))]
            caption = template.format(DIGIT_WORDS[int(digits.target[i])])
            label = f"digit-{digits.target[i]}"
            pairs.append((_encode(rgb.astype(np.uint8), "PNG"), caption, label))
        else:
            name = list(PHOTOS)[int(rng.integers(len(PHOTOS)))]
            im = photos[name]
            side = int(min(im.shape[:2]) * rng.uniform(0.4, 0.9))
            y = int(rng.integers(im.shape[0] - side + 1))
            x = int(rng.integers(im.shape[1] - side + 1))
            crop = Image.fromarray(im[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
            caption = PHOTOS[name][int(rng.integers(2))]
            pairs.append((_encode(np.asarray(crop), "JPEG"), caption, name))
    return pairs


def _synthetic_pairs(n: int) -> list[tuple[bytes, str]]:
    """Tiny pairs: a flat colour per caption, so a few steps can learn them."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (240,) * 3}
    names = list(colours)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        arr = np.zeros((32, 32, 3), dtype=np.uint8) + np.array(colours[name], dtype=np.uint8)
        out.append((_encode(arr, "PNG"), f"a {name} square"))
    return out


TINY = dict(
    embed_dim=32, image_size=32, vision_width=8, vision_head_width=32, text_width=32,
    text_layers=1, text_heads=2, context_length=8, batch_size=16, lr=2e-3, augment=False,
    num_threads=1,
)
SLOW = dict(
    embed_dim=64, image_size=32, vision_width=16, text_width=64, text_heads=2, context_length=16,
    steps=120, batch_size=64, lr=2e-3, num_threads=1,
)


def test_training_lowers_the_loss_and_returns_a_checkpoint() -> None:
    result = train_filter_network(_synthetic_pairs(64), FilterNetworkConfig(**TINY, steps=16))
    meta = result["metadata"]
    assert meta["steps"] == 16 and meta["pairs"] == 64
    assert meta["final_loss"] < meta["initial_loss"]
    config = result["config"]
    assert set(config) >= {"model_name", "model_cfg", "filter_network"}
    assert config["model_cfg"]["vision_cfg"]["layers"] == [1, 1, 1, 1]
    assert config["filter_network"]["steps"] == 16
    assert json.loads(json.dumps(config)) == config and json.dumps(meta)
    assert all(isinstance(v, torch.Tensor) for v in result["state_dict"].values())
    assert "logit_scale" in result["state_dict"]


def test_training_is_deterministic_for_a_seed_and_keeps_the_global_rng() -> None:
    pairs = _synthetic_pairs(32)
    cfg = FilterNetworkConfig(**{**TINY, "augment": True}, steps=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_filter_network(pairs, cfg)["state_dict"]
    assert torch.equal(torch.get_rng_state(), before)
    b = train_filter_network(pairs, cfg)["state_dict"]
    c = train_filter_network(pairs, FilterNetworkConfig(**{**TINY, "augment": True}, steps=3, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c["state_dict"][k]) for k in a)


def test_bad_pairs_are_skipped_and_too_few_pairs_rejected() -> None:
    pairs = _synthetic_pairs(8) + [(b"not an image", "a red square"), (_synthetic_pairs(1)[0][0], " ")]
    result = train_filter_network(pairs, {**TINY, "steps": 1})
    assert result["metadata"]["pairs"] == 8 and result["metadata"]["skipped_pairs"] == 2
    with pytest.raises(ValueError, match="at least 2"):
        train_filter_network(pairs[-2:], FilterNetworkConfig(**TINY, steps=1))


def test_time_budget_stops_training_and_thread_count_is_restored() -> None:
    threads = torch.get_num_threads()
    cfg = FilterNetworkConfig(**{**TINY, "num_threads": threads + 1}, max_seconds=1e-6)
    meta = train_filter_network(_synthetic_pairs(16), cfg)["metadata"]
    assert meta["stopped_by_time_budget"] and meta["steps"] < meta["planned_steps"]
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"image_size": 50}, "image_size"),
        ({"vision_layers": (1, 1, 1)}, "vision_layers"),
        ({"text_heads": 3}, "text_heads"),
        ({"crop_scale": (0.9, 0.5)}, "crop_scale"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_config_errors_name_the_parameter(override: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FilterNetworkConfig(**override)


def test_config_from_dict_rejects_unknown_keys_and_round_trips() -> None:
    with pytest.raises(ValueError, match=r"unknown curation\.filter_network parameter"):
        FilterNetworkConfig.from_dict({"learning_rate": 1e-3})
    cfg = FilterNetworkConfig(vision_layers=(2, 1, 1, 1), steps=5)
    assert FilterNetworkConfig.from_dict(cfg.to_dict()) == cfg


def test_roc_auc() -> None:
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert roc_auc(np.array([1.0, 3.0]), np.array([2.0, np.nan])) == 0.5


@pytest.mark.slow
def test_trained_filter_separates_wrong_captions_on_digits_and_photos() -> None:
    train = digit_photo_pairs(400, seed=0)
    held_out = digit_photo_pairs(200, seed=1)
    result = train_filter_network([(im, cap) for im, cap, _ in train], FilterNetworkConfig(**SLOW))
    scorer = load_clip_model("", checkpoint=result, device="cpu")
    pairs = [(im, cap) for im, cap, _ in held_out]
    quality = wrong_caption_auc(scorer, pairs, groups=[label for _, _, label in held_out])
    assert quality["auc"] >= 0.9, quality


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_request_without_cuda_fails_before_training() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        train_filter_network(_synthetic_pairs(4), FilterNetworkConfig(**TINY, device="cuda"))
