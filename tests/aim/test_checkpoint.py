"""The run directory: kept steps, resume state, result.json, and the checks before a resume."""

from __future__ import annotations

import json

import pytest
import torch

from aim_kedro.aim.checkpoint import (
    RunDir,
    atomic_safetensors,
    load_result,
    load_resume,
    load_step,
    save_last,
)
from aim_kedro.aim.data import split_sources
from aim_kedro.aim.train import train


def test_an_empty_run_dir_has_nothing_to_resume(tmp_path):
    run = RunDir(tmp_path / "never_made")
    assert run.last_step() is None and run.kept_steps() == {}
    assert run.summary() == {"path": str(tmp_path / "never_made"), "last_step": None,
                             "kept_steps": [], "finished_steps": None}
    assert load_resume(run, 10, {"depth": 2}, {}) is None


def test_kept_steps_last_step_and_clear(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare()
    for step in (20, 5, 10):
        atomic_safetensors({"w": torch.full((2,), float(step))}, run.step_file(step))
    save_last(run, model={}, optimizer={}, step=20, history=[], ranks=[], train_config={},
              model_config={"depth": 2})
    assert list(run.kept_steps()) == [5, 10, 20]
    assert run.step_file(5).name == "step_00000005.safetensors"
    assert torch.equal(load_step(run, 10)["w"], torch.full((2,), 10.0))
    assert run.last_step() == 20
    assert not list(run.path.rglob("*.tmp")), "atomic writes leave no temporary file"
    run.clear()
    assert run.kept_steps() == {} and run.last_step() is None


def test_resume_check_skips_a_finished_run_and_refuses_another_model(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare()
    save_last(run, model={}, optimizer={}, step=4, history=[], ranks=[],
              train_config={"batch_size": 8}, model_config={"depth": 2})
    assert load_resume(run, 4, {"depth": 2}, {"batch_size": 8}) is None
    assert load_resume(run, 8, {"depth": 2}, {"batch_size": 16})["step"] == 4
    with pytest.raises(ValueError, match="resume: false"):
        load_resume(run, 8, {"depth": 1}, {"batch_size": 8})


def test_resume_refuses_another_model(tmp_path, tiny_shards, tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=16)
    train_src, _ = split_sources(shards, 0.0)
    train(tiny_train_config(total_steps=3, keep_every=0, stop_at_step=2), train_src, None,
          tmp_path / "run")
    other = tiny_train_config(total_steps=3, model_overrides={"depth": 1})
    with pytest.raises(ValueError, match="resume: false"):
        train(other, train_src, None, tmp_path / "run")


def test_a_finished_run_is_not_resumed_but_started_over(tmp_path, tiny_shards, tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=16)
    train_src, _ = split_sources(shards, 0.0)
    first = train(tiny_train_config(total_steps=3, keep_every=0), train_src, None, tmp_path / "run")
    again = train(tiny_train_config(total_steps=3, keep_every=0, seed=1), train_src, None,
                  tmp_path / "run")
    assert [r["step"] for r in again.history if r.get("train_loss") is not None][-1] == 3
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict.values(),
                                                     again.state_dict.values(), strict=True))


def test_result_json_and_summary_of_a_finished_run(tmp_path, tiny_shards, tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=16)
    train_src, _ = split_sources(shards, 0.0)
    result = train(tiny_train_config(total_steps=4, keep_every=2), train_src, None,
                   RunDir(tmp_path / "run"))
    run = RunDir(tmp_path / "run")
    assert run.summary() == {"path": str(run.path), "last_step": 4, "kept_steps": [0, 2, 4],
                             "finished_steps": 4}
    payload = json.loads(run.result.read_text())
    assert payload["train_config"]["total_steps"] == 4 and payload["config"]["preset"] == "aim_tiny"
    on_disk = load_result(run)
    assert on_disk.history == result.history and sorted(on_disk.intermediate) == [0, 2, 4]
    for name, tensor in result.state_dict.items():
        assert torch.equal(on_disk.state_dict[name], tensor), name


def test_save_last_keeps_the_checkpoint_before_it(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare()
    for step in (2, 4):
        save_last(run, model={}, optimizer={}, step=step, history=[], ranks=[], train_config={},
                  model_config={"depth": 2})
    assert torch.load(run.last, weights_only=False)["step"] == 4
    assert torch.load(run.previous, weights_only=False)["step"] == 2
    assert not list(run.path.glob("*.tmp"))
    run.clear()
    assert not run.last.exists() and not run.previous.exists()


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_last_pt_resumes_from_the_previous_one_and_loses_nothing(
        tmp_path, tiny_shards, tiny_train_config, caplog, damage):
    shards = tiny_shards(tmp_path / "shards", n=32)
    train_src, _ = split_sources(shards, 0.0)
    whole = train(tiny_train_config(keep_every=0), train_src, None, tmp_path / "whole")
    run = RunDir(tmp_path / "run")
    train(tiny_train_config(keep_every=0, stop_at_step=6), train_src, None, run)
    assert run.last_step() == 6 and torch.load(run.previous, weights_only=False)["step"] == 4
    if damage == "truncated":
        _truncate(run.last)
    else:
        run.last.write_bytes(b"\x00garbage" * 1000)
    assert run.last_step() == 4
    with caplog.at_level("WARNING", logger="aim_kedro.aim.checkpoint"):
        resumed = train(tiny_train_config(keep_every=0), train_src, None, run)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(run.last) in warnings and f"resuming from {run.previous} (step 4)" in warnings
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history]
    for name, tensor in whole.state_dict.items():
        assert torch.equal(resumed.state_dict[name], tensor), name


def test_no_readable_resume_checkpoint_is_an_error_not_a_fresh_start(tmp_path, tiny_shards,
                                                                    tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=32)
    train_src, _ = split_sources(shards, 0.0)
    run = RunDir(tmp_path / "run")
    train(tiny_train_config(keep_every=0, stop_at_step=6), train_src, None, run)
    _truncate(run.last)
    _truncate(run.previous)
    with pytest.raises(ValueError, match=r"no readable resume checkpoint.*last\.pt.*previous\.pt"
                                         r".*train\.resume: false"):
        train(tiny_train_config(keep_every=0), train_src, None, run)
    assert run.last.exists() and run.previous.exists()
