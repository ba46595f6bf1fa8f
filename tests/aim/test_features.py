"""Frozen-trunk probe features: layer choice, golden AIM v1 outputs, caching shapes, baselines."""

import io
import json

import pytest
import torch
from conftest import REFERENCE
from PIL import Image
from safetensors.torch import load_file

from aim_kedro.aim.evalsets import LabelledSet
from aim_kedro.aim.features import (
    FrozenTrunk,
    check_layer_spec,
    extract_features,
    extract_split_features,
    random_trunk,
    resolve_layers,
    trunk_from_state_dict,
)
from aim_kedro.aim.interop import from_ml_aim
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config

REF = REFERENCE


@pytest.fixture(scope="module")
def tiny():
    return get_config("aim_tiny")


def test_resolve_layers(tiny):
    deep = get_config("aim_600M")
    assert resolve_layers("last6", deep) == list(range(18, 24))
    assert resolve_layers("last6", tiny) == list(range(tiny.depth))
    assert resolve_layers("best", deep) == list(range(14, 20))
    assert resolve_layers("all", tiny) == [0, 1]
    assert resolve_layers(2, deep) == [22, 23]
    assert resolve_layers([-1, 0], deep) == [23, 0]
    for bad in ("first3", [5], []):
        with pytest.raises(ValueError, match="layers"):
            resolve_layers(bad, tiny)


def test_layer_spec_is_checked_without_a_model():
    for good in ("last6", "last1", "best", "all", 3, [0, -1], [23]):
        check_layer_spec(good)
    for bad in ("middle", "last0", 0, True, [], [1.5], {"a": 1}, None):
        with pytest.raises(ValueError, match="layers"):
            check_layer_spec(bad)


@pytest.mark.skipif(not REF.is_dir(), reason="reference checkpoint files not present")
def test_features_of_golden_model_are_the_mean_of_the_probe_layers():
    config = json.loads((REF / "tiny_aim_v1_config.json").read_text())
    reference = load_file(str(REF / "tiny_aim_v1_io.safetensors"))
    model = from_ml_aim(load_file(str(REF / "tiny_aim_v1.safetensors")), **config)
    frozen = FrozenTrunk(model.trunk, model.trunk.cfg, "golden")
    layers = resolve_layers("best", frozen.cfg)
    assert layers == [2, 3]
    images = reference["input"]
    labels = torch.arange(len(images))
    expected = torch.stack([reference["block_2"], reference["block_3"]]).mean(dim=0)
    exact = extract_features(frozen, [(images, labels)], layers, store_dtype=torch.float32)
    torch.testing.assert_close(exact["tokens"], expected, atol=1e-5, rtol=0)
    assert torch.equal(exact["labels"], labels)
    cached = extract_features(frozen, [(images[:2], labels[:2]), (images[2:], labels[2:])], layers)
    assert cached["tokens"].dtype == torch.float16 and cached["tokens"].shape == (3, 16, 64)
    torch.testing.assert_close(cached["tokens"].float(), expected, atol=2e-2, rtol=1e-2)
    assert not frozen.trunk.training
    assert not any(p.requires_grad for p in frozen.trunk.parameters())


def test_trunk_from_state_dict_reproduces_the_trained_trunk(tiny):
    torch.manual_seed(0)
    model = AIM(tiny)
    frozen = trunk_from_state_dict(tiny, model.state_dict(), "test")
    images = torch.randn(2, 3, tiny.img_size, tiny.img_size)
    with torch.no_grad():
        expected = model.trunk.forward_intermediates(images, [1])[0]
    got = extract_features(frozen, [(images, torch.zeros(2))], [1], store_dtype=torch.float32)
    torch.testing.assert_close(got["tokens"], expected)
    with pytest.raises(ValueError, match="trunk"):
        trunk_from_state_dict(tiny, {"head.out.weight": torch.zeros(1)}, "bad")


def test_random_trunk_is_fixed_by_its_seed(tiny):
    a, b, c = random_trunk(tiny, 0), random_trunk(tiny, 0), random_trunk(tiny, 1)
    weight = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.trunk.state_dict()[weight], b.trunk.state_dict()[weight])
    assert not torch.equal(a.trunk.state_dict()[weight], c.trunk.state_dict()[weight])


def _png(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(20, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_split_features_decode_every_image_once_and_skip_broken_ones(tiny):
    items = [(f"k{i}", _png(i), i % 2) for i in range(5)] + [("broken", b"not an image", 1)]
    labelled = LabelledSet("train", "memory", ["a", "b"], lambda: iter(items), size=len(items))
    out = extract_split_features(random_trunk(tiny, 0), {"train": labelled}, [0, 1], batch_size=2)
    assert out["train"]["tokens"].shape == (5, tiny.num_patches, tiny.embed_dim)
    assert out["train"]["tokens"].dtype == torch.float16
    assert out["train"]["labels"].tolist() == [0, 1, 0, 1, 0]
    assert (
        out["layers"] == [0, 1] and out["num_classes"] == 2 and out["num_heads"] == tiny.num_heads
    )
