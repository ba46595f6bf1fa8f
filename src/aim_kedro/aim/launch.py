"""Pre-training on several GPUs: the ``torchrun`` command, its launch config, and the entry point
every rank runs.

``launch_torchrun(cfg, num_gpus, run_dir, train_source, val_source)`` writes
``run_dir/launch_config.json``, runs ``torchrun --standalone --nproc_per_node=N -m
aim_kedro.aim.train --config run_dir/launch_config.json`` (the same ``train`` under DDP or FSDP2)
and reads back what rank 0 wrote. Multi-node jobs run that ``torchrun`` line on every node with
``--nnodes``/``--rdzv-endpoint`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from aim_kedro.aim import distributed
from aim_kedro.aim.checkpoint import RunDir, TrainResult, as_run_dir, load_result
from aim_kedro.aim.data import ShardSource
from aim_kedro.aim.train import TrainConfig, train

logger = logging.getLogger(__name__)

ENTRY_MODULE = "aim_kedro.aim.train"
LAUNCH_CONFIG = "launch_config.json"


def torchrun_command(config_path: str | Path, num_gpus: int) -> list[str]:
    """The ``torchrun`` command line that runs :func:`main` on ``num_gpus`` local processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={num_gpus}", "-m", ENTRY_MODULE, "--config", str(config_path),
    ]


def write_launch_config(
    cfg: TrainConfig, run_dir: str | Path | RunDir, train_source: ShardSource,
    val_source: ShardSource | None,
) -> Path:
    """Write the JSON that ``python -m aim_kedro.aim.train --config`` reads."""
    run = as_run_dir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    path = run.path / LAUNCH_CONFIG
    path.write_text(json.dumps({
        "train": cfg.to_dict(),
        "train_source": train_source.to_dict(),
        "val_source": val_source.to_dict() if val_source is not None else None,
        "run_dir": str(run.path),
    }, indent=2))
    return path


def launch_torchrun(
    cfg: TrainConfig, num_gpus: int, run_dir: str | Path | RunDir, train_source: ShardSource,
    val_source: ShardSource | None,
) -> TrainResult:
    """Run training under ``torchrun --standalone --nproc_per_node=num_gpus``, wait, read results."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if cfg.distributed == "none":
        cfg = dataclasses.replace(cfg, distributed="ddp")
    cfg.validate(num_gpus)
    path = write_launch_config(cfg, run_dir, train_source, val_source)
    command = torchrun_command(path, num_gpus)
    logger.info("launching: %s", " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {completed.returncode}: {' '.join(command)}")
    return load_result(run_dir)


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun -m aim_kedro.aim.train --config launch_config.json``."""
    parser = argparse.ArgumentParser(description="AIM pre-training, one rank of a torchrun job")
    parser.add_argument("--config", required=True, help="JSON written by write_launch_config")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(name)s %(message)s")
    spec = json.loads(Path(args.config).read_text())
    cfg = TrainConfig.from_dict(spec["train"])
    if rank != 0:
        cfg.progress = False
    val = ShardSource.from_dict(spec["val_source"]) if spec.get("val_source") else None
    try:
        train(cfg, ShardSource.from_dict(spec["train_source"]), val, spec["run_dir"])
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
