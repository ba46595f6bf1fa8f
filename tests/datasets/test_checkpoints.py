"""StateDictDataset: a published checkpoint file (safetensors or .pth) loaded as a state dict."""

import json
from pathlib import Path

import pytest
import torch
from kedro.io import DatasetError
from safetensors.torch import save_file

from aim_kedro.datasets import StateDictDataset

STATE = {"trunk.blocks.0.mlp.fc1.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.ones(4)}


def test_safetensors_and_pth_files_load_as_the_same_state_dict(tmp_path: Path) -> None:
    save_file(STATE, str(tmp_path / "model.safetensors"))
    torch.save({"model": STATE}, tmp_path / "model.pth")
    for name in ("model.safetensors", "model.pth"):
        ds = StateDictDataset(filepath=str(tmp_path / name))
        assert ds.exists()
        loaded = ds.load()
        assert loaded.keys() == STATE.keys()
        assert all(torch.equal(loaded[k], v) for k, v in STATE.items())
        preview = json.loads(ds.preview())
        assert preview["tensors"] == 2 and preview["parameters"] == 10
        assert preview["shapes"]["trunk.blocks.0.mlp.fc1.weight"] == [2, 3]


def test_remote_files_are_read_through_fsspec(tmp_path: Path) -> None:
    import fsspec

    save_file(STATE, str(tmp_path / "m.safetensors"))
    with fsspec.open("memory:///models/aim.safetensors", "wb") as f:
        f.write((tmp_path / "m.safetensors").read_bytes())
    ds = StateDictDataset(filepath="memory:///models/aim.safetensors")
    assert ds.exists() and torch.equal(ds.load()["head.bias"], STATE["head.bias"])


def test_missing_file_wrong_suffix_and_save(tmp_path: Path) -> None:
    ds = StateDictDataset(filepath=str(tmp_path / "absent.safetensors"))
    assert not ds.exists()
    with pytest.raises(DatasetError, match="absent.safetensors"):
        ds.load()
    with pytest.raises(DatasetError, match="read-only"):
        ds.save(STATE)
    with pytest.raises(DatasetError, match="suffix|ends in"):
        StateDictDataset(filepath=str(tmp_path / "model.onnx"))
