"""The sample pool plants each kind in the numbers the parameters ask for, deterministically."""

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from aim_kedro.io.shards import ShardSet, image_bytes, sample_json, write_shards
from aim_kedro.pipelines.sample.nodes import (
    _probe_sample,
    build_probe_sets,
    build_raw_pool,
    split_digits,
    validate_sample_params,
)

PARAMS = yaml.safe_load(Path("conf/base/parameters_sample.yml").read_text())["sample"]
SMALL = {**copy.deepcopy(PARAMS), "counts": {
    "clean_digits": 40, "clean_photos": 30, "wrong_caption": 10, "exact_duplicate": 6,
    "near_duplicate": 8, "face": 12, "corrupt": 8, "eval_leak": 6}, "trusted": {"digit_renders": 1, "photos": 10}}


def _as_shards(samples: list[dict], tmp_path: Path, name: str) -> ShardSet:
    write_shards(samples, str(tmp_path / name), samples_per_shard=500)
    return ShardSet.open(str(tmp_path / name))


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    train, test = build_probe_sets(PARAMS)
    pool, truth, trusted = build_raw_pool(_as_shards(test, tmp, "probe_test"), PARAMS)
    return train, test, pool, truth, trusted


def test_default_pool_size_and_planted_counts(default_sample) -> None:
    _, _, pool, truth, _ = default_sample
    counts = PARAMS["counts"]
    assert len(pool) == truth.height >= 2000
    by_kind = dict(truth.group_by("kind").len().iter_rows())
    assert by_kind["clean"] == counts["clean_digits"] + counts["clean_photos"]
    for kind in ("wrong_caption", "exact_duplicate", "near_duplicate", "face", "corrupt", "eval_leak"):
        assert by_kind[kind] == counts[kind], kind
    assert truth["uid"].n_unique() == truth.height
    assert [sample_json(s)["uid"] for s in pool] == truth["uid"].to_list()
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in truth["uid"])


def test_duplicates_and_leaks_are_what_truth_says(default_sample) -> None:
    _, test, pool, truth, _ = default_sample
    by_uid = {sample_json(s)["uid"]: s for s in pool}
    test_png = {sample_json(s)["eval_id"]: s["png"] for s in test}
    for row in truth.filter(truth["kind"] == "exact_duplicate").iter_rows(named=True):
        copy_bytes = image_bytes(by_uid[row["uid"]])[1]
        source_bytes = image_bytes(by_uid[row["source_uid"]])[1]
        if row["variant"] == "byte_copy":
            assert copy_bytes == source_bytes
        else:
            assert copy_bytes != source_bytes
            a = np.asarray(Image.open(io.BytesIO(copy_bytes)).convert("RGB"))
            b = np.asarray(Image.open(io.BytesIO(source_bytes)).convert("RGB"))
            assert np.array_equal(a, b)
    for row in truth.filter((truth["kind"] == "eval_leak") & (truth["variant"] == "exact")).iter_rows(named=True):
        assert image_bytes(by_uid[row["uid"]])[1] == test_png[row["eval_id"]]
    near = truth.filter(truth["kind"] == "near_duplicate")
    assert set(near["variant"]) == {"resized", "cropped", "jpeg", "color_shift"}
    assert near["source_uid"].null_count() == 0


def test_corrupt_records_are_really_broken(default_sample) -> None:
    _, _, pool, truth, _ = default_sample
    by_uid = {sample_json(s)["uid"]: s for s in pool}
    for row in truth.filter(truth["kind"] == "corrupt").iter_rows(named=True):
        sample = by_uid[row["uid"]]
        if row["variant"] == "no_caption":
            assert "txt" not in sample
            continue
        with pytest.raises(OSError):
            Image.open(io.BytesIO(image_bytes(sample)[1])).convert("RGB").load()


def test_faces_have_boxes_inside_the_image(default_sample) -> None:
    _, _, pool, truth, _ = default_sample
    faces = truth.filter(truth["kind"] == "face")
    size = PARAMS["image_size"]
    for boxes in faces["face_boxes"].to_list():
        assert len(boxes) == 1
        x0, y0, x1, y1 = boxes[0]
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert x1 - x0 >= 0.3 * size
    assert truth.filter(truth["kind"] != "face")["face_boxes"].list.len().max() == 0


def test_probe_sets_are_a_stratified_split_and_pool_digits_avoid_probe_test(default_sample) -> None:
    train, test, pool, truth, trusted = default_sample
    train_ids = {sample_json(s)["eval_id"] for s in train}
    test_ids = {sample_json(s)["eval_id"] for s in test}
    assert not train_ids & test_ids and len(train_ids | test_ids) == 1797
    labels = np.array([int(s["cls"]) for s in test])
    assert np.bincount(labels).min() >= 30
    test_pixels = {np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes() for s in test}
    leaks = set(truth.filter(truth["kind"] == "eval_leak")["uid"])
    for sample in pool:
        if sample_json(sample)["uid"] in leaks or image_bytes(sample) is None:
            continue
        try:
            pixels = np.asarray(Image.open(io.BytesIO(image_bytes(sample)[1])).convert("RGB")).tobytes()
        except Exception:
            continue
        assert pixels not in test_pixels
    trusted_bytes = {image_bytes(s)[1] for s in trusted}
    assert not trusted_bytes & {image_bytes(s)[1] for s in pool if image_bytes(s)}
    assert len(trusted) >= 1000


def test_same_seed_same_pool_other_seed_other_pool(tmp_path: Path) -> None:
    _, test = build_probe_sets(SMALL)
    shards = _as_shards(test, tmp_path, "t")
    a = build_raw_pool(shards, SMALL)
    b = build_raw_pool(shards, SMALL)
    assert [s.get("jpg") for s in a[0]] == [s.get("jpg") for s in b[0]]
    assert a[1].equals(b[1])
    other = {**SMALL, "seed": 1}
    _, test1 = build_probe_sets(other)
    c = build_raw_pool(_as_shards(test1, tmp_path, "t1"), other)
    assert [s.get("jpg") for s in a[0]] != [s.get("jpg") for s in c[0]]


def test_split_is_deterministic() -> None:
    assert all(np.array_equal(x, y) for x, y in zip(split_digits(0, 0.2), split_digits(0, 0.2), strict=True))


@pytest.mark.parametrize(
    "change, message",
    [({"image_size": 32}, "image_size"), ({"image_size": 512}, r"\[64, 256\]"),
     ({"probe_test_fraction": 0.9}, "probe_test_fraction"),
     ({"counts": {"clean_digits": 1}}, "counts")],
)
def test_bad_parameters_fail_before_work(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        validate_sample_params({**PARAMS, **change})


def test_the_highres_size_is_accepted_and_renders_at_224() -> None:
    params = validate_sample_params({**PARAMS, "image_size": 224})
    sample = _probe_sample(0, params["seed"], params["image_size"])  # one of build_probe_sets'
    assert Image.open(io.BytesIO(sample["png"])).size == (224, 224)
