"""The torchrun launcher: its command line, its launch config, and a two-process DDP run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from aim_kedro.aim.data import split_sources
from aim_kedro.aim.launch import launch_torchrun, main, torchrun_command, write_launch_config
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config


def test_torchrun_command_and_launch_config(tmp_path, tiny_shards, tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=8)
    train_src, val_src = split_sources(shards, 30.0)
    path = write_launch_config(tiny_train_config(), tmp_path / "run", train_src, val_src)
    spec = json.loads(path.read_text())
    assert spec["train"]["preset"] == "aim_tiny" and spec["val_source"]["split"] == "val"
    command = torchrun_command(path, 4)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=4" in command
    assert command[-4:] == ["-m", "aim_kedro.aim.train", "--config", str(path)]


def test_the_entry_point_trains_what_the_launch_config_says(tmp_path, tiny_shards,
                                                            tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=16)
    train_src, _ = split_sources(shards, 0.0)
    cfg = tiny_train_config(total_steps=2, warmup_steps=1, keep_every=0, checkpoint_every=0)
    main(["--config", str(write_launch_config(cfg, tmp_path / "run", train_src, None))])
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["metadata"]["steps"] == 2 and result["train_config"]["preset"] == "aim_tiny"


def test_launch_refuses_zero_gpus(tmp_path, tiny_train_config):
    with pytest.raises(ValueError, match="num_gpus"):
        launch_torchrun(tiny_train_config(), 0, tmp_path / "run", None, None)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX shell")
def test_two_process_ddp_under_torchrun(tmp_path, tiny_shards, tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=48, per_shard=8)
    train_src, val_src = split_sources(shards, val_percent=20.0)
    cfg = tiny_train_config(total_steps=2, warmup_steps=1, checkpoint_every=1, keep_every=2,
                            val_every=2)
    try:
        result = launch_torchrun(cfg, 2, tmp_path / "run", train_src, val_src)
    except (RuntimeError, subprocess.SubprocessError) as exc:  # pragma: no cover - env specific
        pytest.fail(f"torchrun failed: {exc}")
    assert result.metadata["steps"] == 2 and result.metadata["world_size"] == 2
    assert result.history[-1]["val_loss"] is not None
    assert sorted(result.intermediate) == [0, 2]
    assert set(result.state_dict) == set(AIM(get_config("aim_tiny")).state_dict())
