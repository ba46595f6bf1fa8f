"""The CLIP scorer: embeddings, cosine scores, zero-shot NSFW, batches, thread pinning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, png_bytes
from PIL import Image

from aim_kedro.curation.clip_models import load_clip_model
from aim_kedro.curation.scoring import (
    SCORE_FIELDS,
    ClipScorer,
    NsfwConfig,
    concat_score_parts,
    records_from_samples,
    score_batch,
    score_shard,
)
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.io.uids import default_uid


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
        ("u3", png_bytes(images[3]), None),
        ("u4", images[4], "   "),
        ("u5", png_bytes(images[1]), CAPTIONS[1]),
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
        {"__key__": "000", "png": png_bytes(images[0]), "txt": "a red square", "json": {"uid": "ab" * 16}},
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



def test_num_threads_pins_the_forward_passes_and_restores_the_setting(
    checkpoint: dict, images: list[Image.Image], monkeypatch
) -> None:
    pinned = load_clip_model("", checkpoint=checkpoint, device="cpu", batch_size=3, num_threads=2)
    seen: list[int] = []
    encode = pinned.model.encode_image
    monkeypatch.setattr(pinned.model, "encode_image",
                        lambda x: seen.append(torch.get_num_threads()) or encode(x))
    before = torch.get_num_threads()
    pinned.embed_images(images)
    assert seen and set(seen) == {2} and torch.get_num_threads() == before
    with pinned.pinned():  # the block the NSFW softmax and the cosine run in, too
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        load_clip_model("", checkpoint=checkpoint, device="cpu", num_threads=0)


def test_concat_score_parts_joins_in_order_with_python_uids(scorer: ClipScorer,
                                                            images: list[Image.Image]) -> None:
    parts = [score_batch(scorer, [(f"u{i}", images[i], CAPTIONS[i])]) for i in range(3)]
    out = concat_score_parts(parts, scorer.embed_dim)
    assert out["uid"].tolist() == ["u0", "u1", "u2"] and out["uid"].dtype == object
    assert set(out) == set(SCORE_FIELDS) and out["image_emb"].shape == (3, 32)
    empty = concat_score_parts([], 32)
    assert empty["text_emb"].shape == (0, 32) and len(empty["uid"]) == 0
