"""ImageFolderDataset: a read-only ImageFolder tree as a labelled set, with a class preview."""

import io
from pathlib import Path

import pytest
from kedro.io import DataCatalog, DatasetError
from PIL import Image

from aim_kedro.aim.evalsets import LabelledSet
from aim_kedro.datasets import ImageFolderDataset


def _tree(root: Path, layout: dict[str, int]) -> None:
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(buf, format="PNG")
            (root / name / f"{i}.png").write_bytes(buf.getvalue())


def test_load_is_a_labelled_set_of_the_tree(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"cat": 2, "ant": 1})
    catalog = DataCatalog.from_config({"probe_train": {
        "type": "aim_kedro.datasets.ImageFolderDataset", "filepath": str(tmp_path / "train")}})
    labelled = catalog.load("probe_train")
    assert isinstance(labelled, LabelledSet) and labelled.name == "train"
    assert labelled.classes == ["ant", "cat"]
    assert [(key, label) for key, _, label in labelled] == [("ant/0.png", 0), ("cat/0.png", 1),
                                                          ("cat/1.png", 1)]
    preview = catalog["probe_train"].preview()
    assert preview["columns"] == ["label", "class", "images"]
    assert preview["data"] == [[0, "ant", 1], [1, "cat", 2]]


def test_missing_tree_does_not_exist_and_saving_is_refused(tmp_path: Path) -> None:
    ds = ImageFolderDataset(filepath=str(tmp_path / "nope"), name="test")
    assert not ds.exists()
    with pytest.raises(DatasetError, match="does not exist"):
        ds.load()
    with pytest.raises(DatasetError, match="read-only"):
        ds.save([])
