"""Loading the scoring CLIP: checkpoint dicts, local folders, the Hub cache, offline failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CAPTIONS
from kedro.io import Version
from PIL import Image
from safetensors.torch import save_file

from aim_kedro.curation import clip_models
from aim_kedro.curation.clip_models import ModelUnavailableError, load_clip_model
from aim_kedro.curation.scoring import ClipScorer
from aim_kedro.datasets import AIMCheckpointDataset


def test_checkpoint_round_trip_through_dataset(
    tmp_path, checkpoint: dict, scorer: ClipScorer, images: list[Image.Image]
) -> None:
    dataset = AIMCheckpointDataset(filepath=str(tmp_path / "filter"), version=Version(None, None))
    dataset.save(checkpoint)
    loaded = load_clip_model("", checkpoint=dataset.load(), device="cpu", batch_size=3)
    assert loaded.model_name == "tiny-test-clip"
    a, b = scorer.score(images, CAPTIONS), loaded.score(images, CAPTIONS)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _write_open_clip_folder(folder, checkpoint: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": checkpoint["config"]["model_cfg"],
              "preprocess_cfg": checkpoint["config"]["preprocess_cfg"]}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(checkpoint["state_dict"], str(folder / "open_clip_model.safetensors"))


def test_local_dir_loads_through_open_clip(
    tmp_path, checkpoint: dict, scorer: ClipScorer, images: list[Image.Image]
) -> None:
    _write_open_clip_folder(tmp_path / "tiny", checkpoint)
    local = load_clip_model(f"local-dir:{tmp_path / 'tiny'}", device="cpu")
    np.testing.assert_allclose(
        local.score(images, CAPTIONS)["clip_score"], scorer.score(images, CAPTIONS)["clip_score"],
        atol=1e-5,
    )


def _no_network(monkeypatch) -> list[str]:
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(repr(args[:1]))
        raise AssertionError("network access attempted")

    monkeypatch.setattr(clip_models.urllib.request, "urlopen", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
    monkeypatch.setattr("open_clip.pretrained.hf_hub_download", refuse)
    return calls


def test_cached_hub_model_loads_offline(
    tmp_path, monkeypatch, checkpoint: dict, scorer: ClipScorer, images: list[Image.Image]
) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    _write_open_clip_folder(repo / "snapshots" / "abc123", checkpoint)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _no_network(monkeypatch)
    hub = load_clip_model("hf-hub:acme/tiny-clip", cache_dir=str(tmp_path / "hub"), device="cpu")
    assert calls == []
    np.testing.assert_allclose(
        hub.score(images, CAPTIONS)["clip_score"], scorer.score(images, CAPTIONS)["clip_score"],
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("model_name", "pretrained"),
    [("hf-hub:apple/DFN2B-CLIP-ViT-L-14", None), ("ViT-L-14", "dfn2b"), ("ViT-B-32", "openai")],
)
def test_uncached_model_fails_at_once_when_offline(
    tmp_path, monkeypatch, model_name: str, pretrained: str | None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _no_network(monkeypatch)
    with pytest.raises(ModelUnavailableError) as err:
        load_clip_model(model_name, pretrained=pretrained, cache_dir=str(tmp_path), device="cpu")
    assert calls == [], "an offline load must not try the network (no retries)"
    message = str(err.value)
    assert model_name in message and "HF_HUB_OFFLINE" in message and "local-dir:" in message


def test_unreachable_hub_fails_at_once_without_offline_flag(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    probes: list[float] = []

    def unreachable(request, timeout):
        probes.append(timeout)
        raise clip_models.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(clip_models.urllib.request, "urlopen", unreachable)
    with pytest.raises(ModelUnavailableError, match="cannot be reached") as err:
        load_clip_model("hf-hub:apple/DFN2B-CLIP-ViT-L-14", cache_dir=str(tmp_path))
    assert "apple/DFN2B-CLIP-ViT-L-14" in str(err.value)
    assert len(probes) == 1 and probes[0] <= clip_models.HUB_PROBE_TIMEOUT_S


def test_missing_local_paths_name_the_parameter(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="pretrained=") as err:
        load_clip_model("ViT-B-32", pretrained=str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="model_name="):
        load_clip_model(f"local-dir:{tmp_path / 'nowhere'}")


def test_bad_arguments_are_rejected(checkpoint: dict) -> None:
    with pytest.raises(ValueError, match="precision"):
        load_clip_model("", checkpoint=checkpoint, precision="fp8")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_clip_model("no-such-arch")
    with pytest.raises(ValueError, match="either pretrained or checkpoint"):
        load_clip_model("x", pretrained="openai", checkpoint=checkpoint)
    with pytest.raises(ValueError, match="model_cfg"):
        load_clip_model("", checkpoint={"config": {}, "state_dict": {}})
    assert load_clip_model("", checkpoint=checkpoint).device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
