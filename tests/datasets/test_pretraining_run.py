"""PretrainingRunDataset: a run-directory handle that always exists, is never saved, previews."""

import json
from pathlib import Path

import pytest
import torch
from kedro.io import DatasetError

from aim_kedro.aim.checkpoint import RunDir, atomic_safetensors, save_last
from aim_kedro.datasets import PretrainingRunDataset


def test_load_gives_a_run_dir_and_a_fresh_folder_exists(tmp_path: Path) -> None:
    ds = PretrainingRunDataset(filepath=str(tmp_path / "run"))
    assert ds.exists() and not (tmp_path / "run").exists()
    run = ds.load()
    assert isinstance(run, RunDir) and run.path == tmp_path / "run"
    assert json.loads(ds.preview()) == {"path": str(tmp_path / "run"), "last_step": None,
                                        "kept_steps": [], "finished_steps": None}
    with pytest.raises(DatasetError, match="run directory"):
        ds.save({"anything": 1})


def test_preview_lists_the_last_step_and_kept_steps(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.prepare()
    for step in (0, 50):
        atomic_safetensors({"w": torch.zeros(1)}, run.step_file(step))
    save_last(run, model={}, optimizer={}, step=75, history=[], ranks=[], train_config={},
              model_config={})
    preview = json.loads(PretrainingRunDataset(filepath=f"file://{tmp_path / 'run'}").preview())
    assert preview["last_step"] == 75 and preview["kept_steps"] == [0, 50]


def test_a_remote_run_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="local folder"):
        PretrainingRunDataset(filepath="s3://bucket/run")
