"""AIM pre-training, nanoGPT style: one config object, one loop, resumable checkpoints.

Single process: ``train(cfg, train_source, val_source, run_dir)``. Several GPUs:
``launch_torchrun(cfg, num_gpus, run_dir, train_source, val_source)`` runs
``torchrun --standalone --nproc_per_node=N -m aim_kedro.aim.train --config run_dir/launch_config.json``
(the same ``train`` under DDP or FSDP2) and reads back what rank 0 wrote. Multi-node jobs run
that ``torchrun`` line on every node with ``--nnodes``/``--rdzv-endpoint`` instead.

``run_dir`` is scratch state for resuming: ``last.pt`` (model, optimizer, step, RNG states, data
position, history; written atomically), ``intermediate/step_XXXXXXXX.safetensors`` (weights every
``keep_every`` steps) and ``result.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from aim_kedro.aim.data import ResumableLoader, ShardSource, eval_batches
from aim_kedro.aim.masks import sample_prefix_len
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import PRESETS, AIMConfig, get_config
from aim_kedro.common.config import from_mapping
from aim_kedro.common.training import cpu_threads, param_groups, warmup_cosine

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("none", "ddp", "fsdp2")
LAST = "last.pt"
RESULT = "result.json"
INTERMEDIATE = "intermediate"
VAL_CACHE_BYTES = 512 * 2**20


@dataclass
class TrainConfig:
    """Every knob of a pre-training run. ``batch_size`` is the GLOBAL batch per optimizer step
    (split over ranks and ``grad_accum_steps``); ``lr=None`` means ``base_lr * batch_size /
    base_batch_size`` (1e-3 at 4096, as in the paper)."""

    preset: str = "aim_sample"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    grad_accum_steps: int = 1
    base_lr: float = 1e-3
    base_batch_size: int = 4096
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 40
    total_steps: int = 400
    grad_clip: float = 1.0
    compile: bool = False
    grad_checkpointing: bool = False
    attn_backend: str | None = None
    num_workers: int = 1
    shuffle_buffer: int = 1000
    seed: int = 0
    checkpoint_every: int = 100
    keep_every: int = 100
    val_every: int = 50
    val_batches: int = 4
    log_every: int = 10
    device: str = "auto"
    precision: str = "auto"
    distributed: str = "none"
    resume: bool = True
    stop_at_step: int | None = None
    progress: bool = True
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.model_overrides = dict(self.model_overrides or {})

    def model_config(self) -> AIMConfig:
        """The AIM architecture: the preset with ``model_overrides`` and ``attn_backend`` applied."""
        overrides = dict(self.model_overrides)
        if self.attn_backend is not None:
            overrides["attn_backend"] = self.attn_backend
        return get_config(self.preset, **overrides)

    def peak_lr(self) -> float:
        """The lr after warm-up: absolute ``lr`` or the linearly scaled base lr."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / self.base_batch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys raise ValueError naming them."""
        return from_mapping(cls, data, "training")

    def validate(self, world_size: int = 1) -> AIMConfig:
        """Check every knob (ValueError naming the parameter and the fix); return the model config."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown; use one of {sorted(PRESETS)}")
        model_cfg = self.model_config()
        positive = ("batch_size", "grad_accum_steps", "total_steps", "base_batch_size",
                    "log_every", "val_batches")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "num_workers", "shuffle_buffer", "checkpoint_every",
                     "keep_every", "val_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 turns it off), got {value!r}")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than total_steps "
                f"({self.total_steps}); lower warmup_steps or raise total_steps"
            )
        per_step = world_size * self.grad_accum_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by num_gpus x grad_accum_steps "
                f"({per_step}); it is the global batch per optimizer step"
            )
        for name in ("lr", "base_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if (value is not None or name != "lr") and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ValueError(f"{name} must be a number, got {value!r} (write 1.0e-3, not 1e-3, in YAML)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or null (scale base_lr), got {self.lr}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS),
                              ("distributed", DISTRIBUTED)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or null (torch's default), got {self.cpu_threads}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1 or null, got {self.stop_at_step}")
        return model_cfg


@dataclass
class TrainResult:
    """What a run produced: history rows, final weights, model config, summary, kept steps."""

    history: list[dict[str, Any]]
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    metadata: dict[str, Any]
    intermediate: dict[int, str]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    return warmup_cosine(step, cfg.total_steps, cfg.warmup_steps, cfg.peak_lr())


class _LossModule(nn.Module):
    """Makes ``AIM.loss`` the forward pass, so DDP/FSDP hooks and torch.compile see it."""

    def __init__(self, model: AIM) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        return self.model.loss(images, prefix_len)


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(cfg: TrainConfig) -> _Dist:
    """Resolve the device and, under torchrun, initialise the process group from the env."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device: auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.distributed == "none" or world == 1:
        return _Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if want_cuda else "gloo")
    return _Dist(rank, world, local_rank, device)


def _wrap(model: AIM, cfg: TrainConfig, dist: _Dist) -> nn.Module:
    """The module the loop calls: loss wrapper, compiled if asked, under DDP or FSDP2."""
    module: nn.Module = _LossModule(model)
    if cfg.distributed == "fsdp2" and dist.world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.trunk.blocks) + list(model.head.blocks):
            fully_shard(block)
        fully_shard(module)
    if cfg.compile:
        module = torch.compile(module)
    if cfg.distributed == "ddp" and dist.world_size > 1:
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def _no_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not sync:
        return module.no_sync()
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(sync)
    return contextlib.nullcontext()


def _full_state(model: AIM, optimizer: torch.optim.Optimizer, cfg: TrainConfig, dist: _Dist):
    """Full (unsharded, CPU) model and optimizer state dicts; a collective under FSDP2."""
    if cfg.distributed == "fsdp2" and dist.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
    model_sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return model_sd, optimizer.state_dict()


def _load_state(model, optimizer, model_sd, optim_sd, cfg: TrainConfig, dist: _Dist) -> None:
    if cfg.distributed == "fsdp2" and dist.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def _rng_state(prefix_gen: torch.Generator, loader: ResumableLoader) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "prefix": prefix_gen.get_state(),
        "data": loader.state_dict(),
    }


def _set_rng_state(state: dict[str, Any], prefix_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    prefix_gen.set_state(state["prefix"])


def _gather(obj: Any, dist: _Dist) -> list[Any]:
    if dist.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


def step_file(run_dir: str | Path, step: int) -> Path:
    """Where the weights kept at ``step`` live."""
    return Path(run_dir) / INTERMEDIATE / f"step_{step:08d}.safetensors"


def _reduce_mean(values: list[float], dist: _Dist) -> list[float]:
    if dist.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return (t / dist.world_size).tolist()


@torch.no_grad()
def validation_loss(
    module: nn.Module, batches: list[torch.Tensor] | Any, num_patches: int, seed: int,
    device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
) -> float | None:
    """Mean pixel loss over the held-out batches with prefixes from a FIXED generator seed, so
    values are comparable across steps (a bidirectional mask would leave no target)."""
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for images in batches:
        prefix = sample_prefix_len(images.shape[0], num_patches, generator=gen)
        with autocast or contextlib.nullcontext():
            loss = module(images.to(device, non_blocking=True), prefix.to(device))
        total += float(loss) * images.shape[0]
        count += images.shape[0]
    return total / count if count else None


def _model_config_dict(cfg: TrainConfig, model_cfg: AIMConfig) -> dict[str, Any]:
    return {**model_cfg.to_dict(), "preset": cfg.preset}


def _fresh_run_dir(run_dir: Path) -> None:
    """Remove a previous run's resume state and kept steps (a run not resuming starts clean)."""
    for path in [run_dir / LAST, run_dir / RESULT, *(run_dir / INTERMEDIATE).glob("step_*.safetensors")]:
        path.unlink(missing_ok=True)


def train(
    cfg: TrainConfig,
    train_source: ShardSource,
    val_source: ShardSource | None,
    run_dir: str | Path,
) -> TrainResult:
    """Pre-train an AIM; resume from ``run_dir/last.pt`` when it exists and ``cfg.resume``."""
    with cpu_threads(cfg.cpu_threads):
        return _train(cfg, train_source, val_source, Path(run_dir))


def _train(cfg: TrainConfig, train_source: ShardSource, val_source: ShardSource | None,
           run_dir: Path) -> TrainResult:
    """The training loop (see :func:`train`)."""
    dist = _setup(cfg)
    model_cfg = cfg.validate(dist.world_size)
    (run_dir / INTERMEDIATE).mkdir(parents=True, exist_ok=True)
    ckpt = _load_checkpoint(run_dir / LAST, cfg, model_cfg) if cfg.resume else None
    if ckpt is None and dist.main:
        _fresh_run_dir(run_dir)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    model = AIM(model_cfg, grad_checkpointing=cfg.grad_checkpointing).to(dist.device)
    module = _wrap(model, cfg, dist)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg), betas=cfg.betas,
        fused=dist.device.type == "cuda",
    )
    prefix_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank)
    micro = cfg.batch_size // (dist.world_size * cfg.grad_accum_steps)
    step, history = 0, []
    data_start = None
    if ckpt is not None:
        _load_state(model, optimizer, ckpt["model"], ckpt["optimizer"], cfg, dist)
        step, history = int(ckpt["step"]), list(ckpt["history"])
        ranks = ckpt["ranks"]
        if len(ranks) == dist.world_size:
            _set_rng_state(ranks[dist.rank], prefix_gen)
            data_start = ranks[dist.rank]["data"]
        else:
            logger.warning("checkpoint has %d ranks, run has %d: data order restarts", len(ranks),
                           dist.world_size)
        if dist.main:
            logger.info("resumed %s at step %d", run_dir / LAST, step)
    loader = ResumableLoader(
        train_source, model_cfg.img_size, micro, seed=cfg.seed, num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer, rank=dist.rank, world_size=dist.world_size,
        start=data_start, pin_memory=dist.device.type == "cuda",
    )
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dist.device.type == "cuda")
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    val_data = _val_batches(val_source, cfg, model_cfg, micro, dist)
    end_step = min(cfg.total_steps, cfg.stop_at_step or cfg.total_steps)
    n_tok = model_cfg.num_patches

    def evaluate() -> float | None:
        model.eval()
        inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        loss = validation_loss(inner, val_data(), n_tok, cfg.seed + 12345, dist.device, autocast)
        model.train()
        mean, seen = _reduce_mean([loss or 0.0, 1.0 if loss is not None else 0.0], dist)
        return mean / seen if seen > 0 else None

    def after_step(row: dict[str, Any]) -> None:
        """Validation, kept weights and checkpoint at ``step`` (all ranks: some are collectives)."""
        keep, final = bool(cfg.keep_every) and step % cfg.keep_every == 0, step == end_step
        save = step > 0 and (final or bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0)
        if keep or final or (cfg.val_every and step % cfg.val_every == 0):
            row["val_loss"] = evaluate()
        history.append(row)
        if dist.main:
            logger.info(_fmt_row(row))
        if keep or save:
            model_sd, optim_sd = _full_state(model, optimizer, cfg, dist)
            ranks = _gather(_rng_state(prefix_gen, loader), dist)
            if dist.main and keep:
                _atomic_safetensors(model_sd, step_file(run_dir, step))
            if dist.main and save:
                _atomic_torch_save({"model": model_sd, "optimizer": optim_sd, "step": step,
                                    "history": history, "ranks": ranks, "train_config": cfg.to_dict(),
                                    "model_config": _model_config_dict(cfg, model_cfg)},
                                   run_dir / LAST)

    if ckpt is None:
        after_step(_row(0, None, lr_at(0, cfg), None, None))
    data: Iterator[torch.Tensor] = iter(loader)
    t0, start_step, loss_acc = time.perf_counter(), step, torch.zeros((), device=dist.device)
    last_mark, last_time = step, time.perf_counter()
    bar = tqdm(total=end_step, initial=step, disable=not (dist.main and cfg.progress), desc="pretrain")
    while step < end_step:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for i in range(cfg.grad_accum_steps):
            images = next(data).to(dist.device, non_blocking=True)
            prefix = sample_prefix_len(images.shape[0], n_tok, generator=prefix_gen).to(dist.device)
            with _no_sync(module, sync=i == cfg.grad_accum_steps - 1):
                with autocast:
                    loss = module(images, prefix) / cfg.grad_accum_steps
                loss.backward()
            loss_acc += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if _due(step, cfg, end_step):
            train_loss = _reduce_mean([float(loss_acc) / (step - last_mark)], dist)[0]
            ips = cfg.batch_size * (step - last_mark) / max(time.perf_counter() - last_time, 1e-9)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            after_step(_row(step, train_loss, lr, _as_float(grad_norm), ips))
            loss_acc.zero_()
            last_mark, last_time = step, time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - t0
    result = _finish(run_dir, cfg, model_cfg, model, optimizer, history, step, seconds, dist)
    log = logger.info if dist.main else logger.debug
    log(
        "trained steps %d-%d (%d images) in %.1f s; final train loss %s, val loss %s",
        start_step, step, (step - start_step) * cfg.batch_size, seconds,
        result.metadata["final_train_loss"], result.metadata["final_val_loss"],
    )
    return result


def _due(step: int, cfg: TrainConfig, end_step: int) -> bool:
    """Whether step ``step`` gets a history row (and maybe validation / checkpoints)."""
    every = (cfg.log_every, cfg.val_every, cfg.keep_every, cfg.checkpoint_every)
    return step == end_step or any(n > 0 and step % n == 0 for n in every)


def _row(step: int, train_loss, lr, grad_norm, ips) -> dict[str, Any]:
    return {"step": step, "train_loss": train_loss, "val_loss": None, "lr": lr,
            "grad_norm": grad_norm, "images_per_s": ips}


def _fmt_row(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']}"]
    for key in ("train_loss", "val_loss", "lr", "grad_norm", "images_per_s"):
        if row[key] is not None:
            parts.append(f"{key} {row[key]:.4g}")
    return " | ".join(parts)


def _as_float(value: torch.Tensor) -> float:
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def _val_batches(val_source, cfg: TrainConfig, model_cfg: AIMConfig, micro: int, dist: _Dist):
    """A callable giving the held-out batches, the same count on every rank (so collectives
    match), cached in memory when they are small."""
    if val_source is None:
        return list

    def read() -> Iterator[torch.Tensor]:
        return eval_batches(val_source, model_cfg.img_size, micro, cfg.val_batches,
                            rank=dist.rank, world_size=dist.world_size)

    cacheable = cfg.val_batches * micro * model_cfg.in_chans * model_cfg.img_size**2 * 4 <= VAL_CACHE_BYTES
    cache: list[torch.Tensor] = []
    count: list[int] = []

    def batches() -> list[torch.Tensor] | Iterator[torch.Tensor]:
        if not count:
            local = list(read()) if cacheable else None
            n = len(local) if local is not None else sum(1 for _ in read())
            count.append(_reduce_min(n, dist))
            cache.extend((local or [])[: count[0]])
        return cache if cacheable else itertools.islice(read(), count[0])

    return batches


def _reduce_min(value: int, dist: _Dist) -> int:
    if dist.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def _load_checkpoint(path: Path, cfg: TrainConfig, model_cfg: AIMConfig) -> dict[str, Any] | None:
    """The resume checkpoint, after checking it belongs to the same model and batch setup."""
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if int(ckpt["step"]) >= cfg.total_steps:
        logger.info("%s holds a finished run (step %d): starting a new run", path, int(ckpt["step"]))
        return None
    saved = ckpt["model_config"]
    if saved != _model_config_dict(cfg, model_cfg):
        raise ValueError(
            f"{path} was written for another model ({saved}); set resume: false to start over, "
            "or point run_dir at a fresh folder"
        )
    old = ckpt["train_config"]
    for key in ("batch_size", "grad_accum_steps", "seed", "total_steps", "lr", "base_lr"):
        if old.get(key) != getattr(cfg, key):
            logger.warning("resuming with %s=%s (checkpoint had %s)", key, getattr(cfg, key),
                           old.get(key))
    return ckpt


def _finish(run_dir, cfg, model_cfg, model, optimizer, history, step, seconds, dist) -> TrainResult:
    """Gather the final weights, write result.json (rank 0), and build the TrainResult."""
    model_sd, _ = _full_state(model, optimizer, cfg, dist)
    trained = [r for r in history if r["train_loss"] is not None]
    validated = [r for r in history if r["val_loss"] is not None]
    metadata = {
        "steps": step,
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
        "final_val_loss": validated[-1]["val_loss"] if validated else None,
        "first_val_loss": validated[0]["val_loss"] if validated else None,
        "images_seen": step * cfg.batch_size,
        "run_dir": str(run_dir),
        "seconds_this_run": seconds,
        "world_size": dist.world_size,
    }
    intermediate = {
        int(p.stem.split("_")[1]): str(p)
        for p in sorted((run_dir / INTERMEDIATE).glob("step_*.safetensors"))
    }
    result = TrainResult(history, model_sd, _model_config_dict(cfg, model_cfg), metadata,
                         intermediate)
    if dist.main:
        payload = {"history": history, "config": result.config, "metadata": metadata,
                   "train_config": cfg.to_dict()}
        tmp = run_dir / (RESULT + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, run_dir / RESULT)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return result


def load_result(run_dir: str | Path) -> TrainResult:
    """Read the TrainResult a (torchrun) run left in ``run_dir``: result.json + last.pt weights."""
    run_dir = Path(run_dir)
    payload = json.loads((run_dir / RESULT).read_text())
    ckpt = torch.load(run_dir / LAST, map_location="cpu", weights_only=False)
    intermediate = {
        int(p.stem.split("_")[1]): str(p)
        for p in sorted((run_dir / INTERMEDIATE).glob("step_*.safetensors"))
    }
    return TrainResult(payload["history"], ckpt["model"], payload["config"], payload["metadata"],
                       intermediate)


def load_step(run_dir: str | Path, step: int) -> dict[str, torch.Tensor]:
    """The weights kept at ``step``."""
    return load_file(str(step_file(run_dir, step)))


def torchrun_command(config_path: str | Path, num_gpus: int) -> list[str]:
    """The ``torchrun`` command line that runs :func:`main` on ``num_gpus`` local processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={num_gpus}", "-m", "aim_kedro.aim.train", "--config", str(config_path),
    ]


def write_launch_config(
    cfg: TrainConfig, run_dir: str | Path, train_source: ShardSource,
    val_source: ShardSource | None,
) -> Path:
    """Write the JSON that ``python -m aim_kedro.aim.train --config`` reads."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "launch_config.json"
    path.write_text(json.dumps({
        "train": cfg.to_dict(),
        "train_source": train_source.to_dict(),
        "val_source": val_source.to_dict() if val_source is not None else None,
        "run_dir": str(run_dir),
    }, indent=2))
    return path


def launch_torchrun(
    cfg: TrainConfig, num_gpus: int, run_dir: str | Path, train_source: ShardSource,
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
