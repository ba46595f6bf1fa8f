"""Labelled evaluation sets: ImageFolder trees and webdataset shards with a ``cls`` field."""

import io

import pytest
from PIL import Image

from aim_kedro.aim.evalsets import (
    from_image_folder,
    from_shards,
    image_folder_classes,
    labelled_pair,
    open_labelled_pair,
    parse_cls,
    with_classes,
)
from aim_kedro.io.shards import ShardSet, write_shards


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root, layout: dict[str, int]) -> None:
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"img{i}.png").write_bytes(png(10 * i))
    (root / next(iter(layout)) / "notes.txt").write_text("not an image")


def test_image_folder_indexes_sorted_class_folders(tmp_path):
    make_folder(tmp_path / "train", {"zebra": 2, "ant": 3, "bee": 1})
    labelled = from_image_folder(str(tmp_path / "train"))
    assert labelled.classes == ["ant", "bee", "zebra"]
    items = list(labelled)
    assert len(items) == len(labelled) == 6
    assert [label for _, _, label in items] == [0, 0, 0, 1, 2, 2]
    key, data, _ = items[0]
    assert key == "ant/img0.png" and Image.open(io.BytesIO(data)).size == (8, 8)
    assert list(labelled) == items


def test_image_folder_test_split_shares_the_training_index(tmp_path):
    make_folder(tmp_path / "train", {"ant": 1, "bee": 1, "cat": 1})
    make_folder(tmp_path / "val", {"cat": 2})
    train, test = open_labelled_pair("image_folder", str(tmp_path / "train"), str(tmp_path / "val"))
    assert [label for _, _, label in test] == [2, 2]
    assert test.num_classes == 3


def test_labelled_sets_pass_through_and_the_test_split_takes_the_training_index(tmp_path):
    make_folder(tmp_path / "train", {"ant": 1, "bee": 2, "cat": 1})
    make_folder(tmp_path / "val", {"bee": 1, "cat": 2})
    train_set = from_image_folder(str(tmp_path / "train"), name="train")
    train, test = labelled_pair(train_set, from_image_folder(str(tmp_path / "val")))
    assert train is train_set and test.classes == ["ant", "bee", "cat"]
    assert [label for _, _, label in test] == [1, 2, 2] and len(test) == 3
    assert with_classes(train, train.classes) is train
    write_shards([{"__key__": "a", "png": png(0), "cls": "0"}], str(tmp_path / "shards"))
    with pytest.raises(ValueError, match="different kinds"):
        labelled_pair(train_set, str(tmp_path / "shards"))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder_classes(str(tmp_path / "missing"))
    make_folder(tmp_path / "train", {"ant": 1})
    make_folder(tmp_path / "val", {"ant": 1, "dog": 1})
    with pytest.raises(ValueError, match="dog"):
        open_labelled_pair("image_folder", str(tmp_path / "train"), str(tmp_path / "val"))
    with pytest.raises(ValueError, match="unknown labelled set kind"):
        open_labelled_pair("csv", str(tmp_path / "train"), str(tmp_path / "val"))


def test_shards_with_cls_yield_labels_and_skip_unlabelled(tmp_path):
    samples = [
        {
            "__key__": f"s{i:03d}",
            "png": png(i),
            "cls": str(i % 3),
            "json": {"eval_id": f"e{i}", "label": i % 3},
        }
        for i in range(7)
    ]
    samples.append({"__key__": "nolabel", "png": png(1)})
    write_shards(samples, str(tmp_path / "shards"), samples_per_shard=3)
    labelled = from_shards(str(tmp_path / "shards"), name="train")
    assert labelled.num_classes == 3
    items = list(labelled)
    assert [label for _, _, label in items] == [i % 3 for i in range(7)]
    assert items[0][0] == "s000"
    assert Image.open(io.BytesIO(items[0][1])).getpixel((0, 0)) == (0, 0, 0)


def test_shard_pair_counts_classes_over_both_splits(tmp_path):
    write_shards([{"__key__": "a", "png": png(0), "cls": "0"}], str(tmp_path / "train"))
    write_shards([{"__key__": "b", "png": png(0), "cls": "4"}], str(tmp_path / "test"))
    train, test = open_labelled_pair(
        "shards", ShardSet.open(str(tmp_path / "train")), str(tmp_path / "test")
    )
    assert train.num_classes == test.num_classes == 5
    train, _ = open_labelled_pair(
        "shards", str(tmp_path / "train"), str(tmp_path / "test"), num_classes=10
    )
    assert train.num_classes == 10


def test_parse_cls_reads_text_bytes_and_ints():
    assert parse_cls(b"7\n") == 7
    assert parse_cls(" 3") == 3
    assert parse_cls(2) == 2
