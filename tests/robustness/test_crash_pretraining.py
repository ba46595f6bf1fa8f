"""A pre-training process killed with SIGKILL between checkpoints resumes on its own, exactly."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sigkill_when
from PIL import Image

from aim_kedro.aim.checkpoint import LAST
from aim_kedro.aim.data import split_sources
from aim_kedro.aim.train import TrainConfig, train
from aim_kedro.io.shards import write_shards

CHILD = """
import json, sys, time
import torch
from aim_kedro.aim.data import split_sources
from aim_kedro.aim.train import TrainConfig, train

torch.set_num_threads(1)
args = json.loads(sys.argv[1])
source, _ = split_sources(args["shards"], 0.0)
cfg = TrainConfig(**args["cfg"])
train(cfg, source, None, args["run_dir"])
time.sleep(600)  # a finished child waits to be killed, like a job that overran its slot
"""


def _shards(out: Path) -> list[str]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(48):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
        samples.append({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": "x", "json": {"uid": f"{i:032x}"}})
    return write_shards(samples, str(out), samples_per_shard=12)


def _cfg(**overrides) -> TrainConfig:
    base = dict(preset="aim_tiny", batch_size=8, lr=3e-3, warmup_steps=2, total_steps=40, num_workers=0,
                shuffle_buffer=16, checkpoint_every=2, keep_every=0, val_every=0, log_every=1,
                device="cpu", progress=False, seed=3)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    shards = _shards(tmp_path / "shards")
    source, _ = split_sources(shards, 0.0)
    reference = train(_cfg(), source, None, tmp_path / "reference")

    run_dir = tmp_path / "crashed"
    child_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(_cfg()).items()}
    payload = json.dumps({"shards": shards, "cfg": child_cfg, "run_dir": str(run_dir)})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, payload])

    def between_checkpoints() -> bool:
        last = run_dir / LAST
        return last.exists() and 2 <= torch.load(last, map_location="cpu", weights_only=False)["step"] < 30

    sigkill_when(proc, between_checkpoints, 120, "a checkpoint at step 2-29")
    killed_at = torch.load(run_dir / LAST, map_location="cpu", weights_only=False)["step"]
    assert 2 <= killed_at < 40, "the kill landed between checkpoints, before the end"

    resumed = train(_cfg(), source, None, run_dir)
    for name, tensor in reference.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[name], tensor, rtol=0, atol=0, msg=name)
