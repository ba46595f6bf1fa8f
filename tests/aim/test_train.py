"""Pre-training loop: param groups, lr schedule, validation, exact resume, loss decrease, torchrun."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from aim_kedro.aim.data import split_sources
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config
from aim_kedro.aim.train import (
    LAST,
    TrainConfig,
    launch_torchrun,
    load_result,
    load_step,
    lr_at,
    param_groups,
    torchrun_command,
    train,
    write_launch_config,
)
from aim_kedro.io.shards import write_shards


def _smooth_image(rng: np.random.Generator, size: int) -> bytes:
    """A colour gradient with a bright square: structure a tiny model can learn to predict."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = a * xx[..., None] + b * yy[..., None]
    x0, y0 = rng.integers(0, size // 2, 2)
    img[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.uniform(0, 1, 3)
    buf = io.BytesIO()
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tiny_shards(out_dir, n: int = 64, size: int = 20, per_shard: int = 16) -> list[str]:
    """Tiny shards in the curation stage's layout (png + txt + json with uid)."""
    rng = np.random.default_rng(0)
    samples = (
        {"__key__": f"{i:06d}", "png": _smooth_image(rng, size), "txt": f"sample {i}",
         "json": {"uid": f"{i:032x}", "source": "test"}}
        for i in range(n)
    )
    return write_shards(samples, str(out_dir), samples_per_shard=per_shard)


def tiny_config(**overrides) -> TrainConfig:
    base = dict(preset="aim_tiny", batch_size=8, lr=3e-3, warmup_steps=2, total_steps=8,
                num_workers=0, shuffle_buffer=16, checkpoint_every=2, keep_every=4, val_every=4,
                val_batches=2, log_every=1, device="cpu", progress=False)
    return TrainConfig(**{**base, **overrides})


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
    cfg = TrainConfig(batch_size=1024, warmup_steps=10, total_steps=110)
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
    ],
)
def test_validate_names_the_parameter(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides).validate()


def test_resume_continues_exactly(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards")
    train_src, val_src = split_sources(shards, val_percent=20.0)
    straight = train(tiny_config(), train_src, val_src, tmp_path / "straight")

    run_dir = tmp_path / "resumed"
    first = train(tiny_config(stop_at_step=4), train_src, val_src, run_dir)
    assert first.metadata["steps"] == 4 and (run_dir / LAST).exists()
    second = train(tiny_config(), train_src, val_src, run_dir)
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
    again = train(tiny_config(), train_src, val_src, run_dir)
    assert again.metadata["steps"] == 8 and len(again.history) == len(second.history)
    # resume: false starts over
    fresh = train(tiny_config(resume=False, total_steps=3, keep_every=0), train_src, val_src, run_dir)
    assert fresh.metadata["steps"] == 3 and fresh.intermediate == {}


def test_resume_refuses_another_model(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=16)
    train_src, _ = split_sources(shards, 0.0)
    train(tiny_config(total_steps=3, keep_every=0, stop_at_step=2), train_src, None, tmp_path / "run")
    other = tiny_config(total_steps=3, model_overrides={"depth": 1})
    with pytest.raises(ValueError, match="resume: false"):
        train(other, train_src, None, tmp_path / "run")


def test_a_finished_run_is_not_resumed_but_started_over(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=16)
    train_src, _ = split_sources(shards, 0.0)
    first = train(tiny_config(total_steps=3, keep_every=0), train_src, None, tmp_path / "run")
    again = train(tiny_config(total_steps=3, keep_every=0, seed=1), train_src, None, tmp_path / "run")
    assert [r["step"] for r in again.history if r.get("train_loss") is not None][-1] == 3
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict.values(), again.state_dict.values(), strict=True))


@pytest.mark.slow
def test_short_run_lowers_validation_loss(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=96)
    train_src, val_src = split_sources(shards, val_percent=20.0)
    cfg = tiny_config(batch_size=16, total_steps=40, warmup_steps=4, checkpoint_every=0,
                      keep_every=0, val_every=20, log_every=10, val_batches=4)
    result = train(cfg, train_src, val_src, tmp_path / "run")
    vals = [r["val_loss"] for r in result.history if r["val_loss"] is not None]
    assert len(vals) == 3
    assert vals[-1] < 0.8 * vals[0]
    assert result.metadata["images_seen"] == 40 * 16
    assert all(r["grad_norm"] > 0 for r in result.history if r["grad_norm"] is not None)
    on_disk = load_result(tmp_path / "run")
    assert on_disk.metadata["final_val_loss"] == pytest.approx(vals[-1])


def test_torchrun_command_and_launch_config(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=8)
    train_src, val_src = split_sources(shards, 30.0)
    path = write_launch_config(tiny_config(), tmp_path / "run", train_src, val_src)
    spec = json.loads(path.read_text())
    assert spec["train"]["preset"] == "aim_tiny" and spec["val_source"]["split"] == "val"
    command = torchrun_command(path, 4)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=4" in command
    assert command[-4:] == ["-m", "aim_kedro.aim.train", "--config", str(path)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX shell")
def test_two_process_ddp_under_torchrun(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=48, per_shard=8)
    train_src, val_src = split_sources(shards, val_percent=20.0)
    cfg = tiny_config(total_steps=2, warmup_steps=1, checkpoint_every=1, keep_every=2, val_every=2)
    try:
        result = launch_torchrun(cfg, 2, tmp_path / "run", train_src, val_src)
    except (RuntimeError, subprocess.SubprocessError) as exc:  # pragma: no cover - env specific
        pytest.fail(f"torchrun failed: {exc}")
    assert result.metadata["steps"] == 2 and result.metadata["world_size"] == 2
    assert result.history[-1]["val_loss"] is not None
    assert sorted(result.intermediate) == [0, 2]
    assert set(result.state_dict) == set(AIM(get_config("aim_tiny")).state_dict())
