"""Tests of CLIP scoring: loading (checkpoint, local files, hub cache, offline), embeddings, NSFW."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
import torch
from kedro.io import Version
from PIL import Image
from safetensors.torch import save_file

from aim_kedro.curation import clip_score
from aim_kedro.curation.clip_score import (
    ClipScorer,
    ModelUnavailableError,
    NsfwConfig,
    load_clip_model,
    records_from_samples,
    score_batch,
    score_index,
    score_shard,
)
from aim_kedro.curation.filter_network import (
    FilterNetworkConfig,
    build_filter_model,
    open_clip_model_cfg,
    preprocess_cfg_for,
)
from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.datasets import AIMCheckpointDataset
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.io.uids import default_uid

TINY = FilterNetworkConfig(
    embed_dim=32, image_size=32, vision_width=8, vision_head_width=32, text_width=32,
    text_layers=1, text_heads=2, context_length=8,
)
CAPTIONS = ["a red square", "a photo of a cat", "two coins", "a blue circle", "digit seven"]


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_filter_model(TINY)
    return {
        "config": {
            "model_name": "tiny-test-clip",
            "model_cfg": open_clip_model_cfg(TINY),
            "preprocess_cfg": preprocess_cfg_for(TINY.image_size),
        },
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "metadata": {},
    }


@pytest.fixture(scope="module")
def scorer(checkpoint: dict) -> ClipScorer:
    return load_clip_model("", checkpoint=checkpoint, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (64, 48), (33, 80), (50, 50), (20, 30)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out[3] = out[3].convert("L")
    out[4] = out[4].convert("RGBA")
    return out


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_embeddings_are_float16_and_normalised(scorer: ClipScorer, images: list[Image.Image]) -> None:
    img = scorer.embed_images(images)
    txt = scorer.embed_texts(CAPTIONS)
    for emb in (img, txt):
        assert emb.dtype == np.float16
        assert emb.shape == (5, 32)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert scorer.embed_images([]).shape == (0, 32)


def test_batching_does_not_change_embeddings(checkpoint: dict, images: list[Image.Image]) -> None:
    one = load_clip_model("", checkpoint=checkpoint, device="cpu", batch_size=1)
    many = load_clip_model("", checkpoint=checkpoint, device="cpu", batch_size=64)
    np.testing.assert_allclose(
        one.embed_images(images).astype(np.float32),
        many.embed_images(images).astype(np.float32),
        atol=2e-3,
    )


def test_score_is_cosine_of_returned_embeddings(scorer: ClipScorer, images: list[Image.Image]) -> None:
    out = scorer.score(images, CAPTIONS)
    assert out["clip_score"].dtype == np.float32 and out["nsfw_score"].dtype == np.float32
    cosine = (out["image_emb"].astype(np.float32) * out["text_emb"].astype(np.float32)).sum(1)
    np.testing.assert_allclose(out["clip_score"], cosine, atol=2e-3)
    assert np.all((out["nsfw_score"] >= 0) & (out["nsfw_score"] <= 1))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.score(images[:2], CAPTIONS[:1])


def test_nsfw_is_softmax_share_of_nsfw_prompts(scorer: ClipScorer, images: list[Image.Image]) -> None:
    same = NsfwConfig(nsfw_prompts=("a photo",), safe_prompts=("a photo", "a photo", "a photo"))
    np.testing.assert_allclose(scorer.nsfw_scores(images, same), 0.25, atol=1e-5)
    default = scorer.nsfw_scores(images)
    assert default.shape == (5,) and np.all((default >= 0) & (default <= 1))
    with pytest.raises(ValueError, match="threshold"):
        NsfwConfig(threshold=1.5)
    with pytest.raises(ValueError, match="unknown nsfw parameter"):
        NsfwConfig.from_dict({"prompts": ["x"]})


def test_score_shard_flags_missing_image_or_caption(
    scorer: ClipScorer, images: list[Image.Image]
) -> None:
    records = [
        ("u0", images[0], CAPTIONS[0]),
        ("u1", None, CAPTIONS[1]),
        ("u2", b"not an image", CAPTIONS[2]),
        ("u3", _png(images[3]), None),
        ("u4", images[4], "   "),
        ("u5", _png(images[1]), CAPTIONS[1]),
        ("u6", images[2], CAPTIONS[2]),
    ]
    out = score_shard(scorer, records, batch_size=2, progress=False)
    assert list(out["uid"]) == [f"u{i}" for i in range(7)]
    assert out["image_emb"].dtype == np.float16 and out["image_emb"].shape == (7, 32)
    np.testing.assert_array_equal(out["has_image"], [1, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["has_text"], [1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(out["valid"], [1, 0, 0, 0, 0, 1, 1])
    assert np.isnan(out["clip_score"][~out["valid"]]).all()
    assert not np.isnan(out["clip_score"][out["valid"]]).any()
    assert np.isnan(out["nsfw_score"][[1, 2]]).all() and not np.isnan(out["nsfw_score"][[0, 3, 4]]).any()
    assert not out["image_emb"][[1, 2]].any() and not out["text_emb"][[3, 4]].any()
    direct = scorer.score([images[0], images[1], images[2]], [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]])
    np.testing.assert_allclose(out["clip_score"][[0, 5, 6]], direct["clip_score"], atol=1e-5)


def test_records_from_shard_samples(tmp_path, scorer: ClipScorer, images: list[Image.Image]) -> None:
    samples = [
        {"__key__": "000", "png": _png(images[0]), "txt": "a red square", "json": {"uid": "ab" * 16}},
        {"__key__": "001", "txt": "no image here"},
    ]
    write_shards(samples, str(tmp_path), samples_per_shard=10)
    records = list(records_from_samples(ShardSet.open(str(tmp_path))))
    assert [r[0] for r in records] == ["ab" * 16, default_uid("shard-000000.tar", "001")]
    assert records[0][1] == samples[0]["png"] and records[1][1] is None
    assert records[0][2] == "a red square"
    out = score_shard(scorer, records, progress=False)
    np.testing.assert_array_equal(out["valid"], [True, False])


def test_score_shard_of_nothing_has_the_right_shapes(scorer: ClipScorer) -> None:
    out = score_shard(scorer, iter([]), progress=False)
    assert out["image_emb"].shape == (0, 32) and out["clip_score"].shape == (0,)
    assert score_batch(scorer, [])["text_emb"].shape == (0, 32)


def _indexed_pool(root, images: list[Image.Image]) -> tuple[ShardSet, pl.DataFrame]:
    samples = [
        {"__key__": f"{i:03d}", "png": _png(images[i % len(images)]), "txt": CAPTIONS[i % 5],
         "json": {"uid": f"{i:032x}"}}
        for i in range(9)
    ]
    write_shards(samples, str(root), samples_per_shard=3)
    shards = ShardSet.open(str(root))
    index, _ = build_index(shards, IndexConfig(), progress=False)
    return shards, index


def test_score_index_resumes_from_finished_shards(
    tmp_path, monkeypatch, checkpoint: dict, scorer: ClipScorer, images: list[Image.Image]
) -> None:
    shards, index = _indexed_pool(tmp_path / "pool", images)
    cache = ShardResultCache(str(tmp_path / "cache"))
    full, counts = score_index(scorer, shards, index, IndexConfig(), 2, cache=cache, progress=False)
    assert counts == {"shards": 3, "scored_shards": 3, "resumed_shards": 0}
    assert full["uid"].tolist() == index["uid"].to_list()
    entries = cache.keys("clip_score")
    assert len(entries) == 3
    # a run killed after two shards: the third entry was never written
    (tmp_path / "cache" / f"{entries[-1]}.npz").unlink()
    scored = []
    monkeypatch.setattr(
        clip_score, "score_shard",
        lambda *args, **kwargs: scored.append(1) or score_shard(*args, **kwargs),
    )
    resumed, counts = score_index(scorer, shards, index, IndexConfig(), 2, cache=cache, progress=False)
    assert counts == {"shards": 3, "scored_shards": 1, "resumed_shards": 2} and len(scored) == 1
    for name in clip_score.SCORE_FIELDS:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)
    assert resumed["uid"].dtype == object
    # another model (or batch size) never reuses these entries
    other = {**checkpoint, "state_dict": {k: v + 0.01 for k, v in checkpoint["state_dict"].items()}}
    other_scorer = load_clip_model("", checkpoint=other, device="cpu", batch_size=3)
    _, counts = score_index(other_scorer, shards, index, IndexConfig(), 2, cache=cache, progress=False)
    assert counts["resumed_shards"] == 0
    _, counts = score_index(scorer, shards, index, IndexConfig(), 4, cache=cache, progress=False)
    assert counts["resumed_shards"] == 0


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

    monkeypatch.setattr(clip_score.urllib.request, "urlopen", refuse)
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
        raise clip_score.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(clip_score.urllib.request, "urlopen", unreachable)
    with pytest.raises(ModelUnavailableError, match="cannot be reached") as err:
        load_clip_model("hf-hub:apple/DFN2B-CLIP-ViT-L-14", cache_dir=str(tmp_path))
    assert "apple/DFN2B-CLIP-ViT-L-14" in str(err.value)
    assert len(probes) == 1 and probes[0] <= clip_score.HUB_PROBE_TIMEOUT_S


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
