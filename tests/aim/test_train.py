"""Pre-training loop: param groups, lr schedule, validation, exact resume, loss decrease."""

from __future__ import annotations

import pytest
import torch

from aim_kedro.aim.checkpoint import LAST, load_result, load_step
from aim_kedro.aim.data import split_sources
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config
from aim_kedro.aim.train import TrainConfig, lr_at, train
from aim_kedro.common.training import param_groups


def test_param_groups_skip_decay_on_biases_norms_and_1d():
    model = AIM(get_config("aim_tiny"))
    groups = param_groups(model, 0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "trunk.patch_embed.proj.bias" in no_decay_names
    assert "trunk.blocks.0.norm1.weight" in no_decay_names
    assert "head.norm.bias" in no_decay_names
    assert "trunk.blocks.0.attn.qkv.weight" in decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_warmup_cosine_and_scaling():
    cfg = TrainConfig(batch_size=1024, warmup_steps=10, total_steps=110, lr=1e-3,
                      lr_scaling="linear")
    assert cfg.peak_lr() == pytest.approx(1e-3 * 1024 / 4096)
    lrs = [lr_at(s, cfg) for s in range(cfg.total_steps)]
    assert lrs[0] == pytest.approx(cfg.peak_lr() / 10)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert lrs[9] == pytest.approx(cfg.peak_lr())
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[60] == pytest.approx(cfg.peak_lr() / 2)
    assert lrs[-1] < 1e-3 * cfg.peak_lr()
    assert TrainConfig(lr=0.01).peak_lr() == 0.01


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"preset": "aim_huge"}, "preset"),
        ({"model_overrides": {"img_size": 18}}, "divisible by patch_size"),
        ({"batch_size": 10, "grad_accum_steps": 4}, "grad_accum_steps"),
        ({"warmup_steps": 8}, "warmup_steps"),
        ({"device": "tpu"}, "device"),
        ({"lr": -1.0}, "lr"),
        ({"keep_every": -1}, "keep_every"),
        ({"cpu_threads": 0}, "cpu_threads"),
    ],
)
def test_validate_names_the_parameter(overrides, match, tiny_train_config):
    with pytest.raises(ValueError, match=match):
        tiny_train_config(**overrides).validate()


def test_resume_continues_exactly(tmp_path, tiny_shards, tiny_train_config):
    shards = tiny_shards(tmp_path / "shards")
    train_src, val_src = split_sources(shards, val_percent=20.0)
    straight = train(tiny_train_config(), train_src, val_src, tmp_path / "straight")

    run_dir = tmp_path / "resumed"
    first = train(tiny_train_config(stop_at_step=4), train_src, val_src, run_dir)
    assert first.metadata["steps"] == 4 and (run_dir / LAST).exists()
    second = train(tiny_train_config(), train_src, val_src, run_dir)
    assert second.metadata["steps"] == 8

    assert straight.state_dict.keys() == second.state_dict.keys()
    for key, value in straight.state_dict.items():
        assert torch.equal(value, second.state_dict[key]), key
    steps = [row["step"] for row in second.history]
    assert steps == list(range(0, 9))
    assert [r["train_loss"] for r in second.history] == [r["train_loss"] for r in straight.history]
    assert second.history[0]["train_loss"] is None and second.history[0]["val_loss"] is not None
    assert sorted(second.intermediate) == [0, 4, 8]
    kept = load_step(run_dir, 8)
    assert torch.equal(kept["trunk.blocks.0.attn.qkv.weight"],
                       straight.state_dict["trunk.blocks.0.attn.qkv.weight"])
    # a finished run resumed again trains nothing and returns the same result
    again = train(tiny_train_config(), train_src, val_src, run_dir)
    assert again.metadata["steps"] == 8 and len(again.history) == len(second.history)
    # resume: false starts over
    fresh = train(tiny_train_config(resume=False, total_steps=3, keep_every=0), train_src, val_src,
                  run_dir)
    assert fresh.metadata["steps"] == 3 and fresh.intermediate == {}


@pytest.mark.slow
def test_short_run_lowers_validation_loss(tmp_path, tiny_shards, tiny_train_config):
    shards = tiny_shards(tmp_path / "shards", n=96)
    train_src, val_src = split_sources(shards, val_percent=20.0)
    cfg = tiny_train_config(batch_size=16, total_steps=40, warmup_steps=4, checkpoint_every=0,
                            keep_every=0, val_every=20, log_every=10, val_batches=4)
    result = train(cfg, train_src, val_src, tmp_path / "run")
    vals = [r["val_loss"] for r in result.history if r["val_loss"] is not None]
    assert len(vals) == 3
    assert vals[-1] < 0.8 * vals[0]
    assert result.metadata["images_seen"] == 40 * 16
    assert all(r["grad_norm"] > 0 for r in result.history if r["grad_norm"] is not None)
    on_disk = load_result(tmp_path / "run")
    assert on_disk.metadata["final_val_loss"] == pytest.approx(vals[-1])
