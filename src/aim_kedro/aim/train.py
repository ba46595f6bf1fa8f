"""AIM pre-training, nanoGPT style: one config object and one loop.

``train(cfg, train_source, val_source, run_dir)`` runs in this process, or as every rank of a
``torchrun`` job (DDP or FSDP2, see :mod:`aim_kedro.aim.distributed`); :mod:`aim_kedro.aim.launch`
starts such a job (``python -m aim_kedro.aim.train --config ...`` is its entry point).
``run_dir`` (:mod:`aim_kedro.aim.checkpoint`) holds the resume state, the kept steps and the
result; a run resumes from it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from aim_kedro.aim import distributed as D
from aim_kedro.aim.checkpoint import (
    RunDir,
    TrainResult,
    as_run_dir,
    atomic_safetensors,
    load_resume,
    rng_state,
    run_result,
    save_last,
    set_rng_state,
    write_result,
)
from aim_kedro.aim.data import ResumableLoader, ShardSource
from aim_kedro.aim.masks import sample_prefix_len
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import PRESETS, AIMConfig, get_config
from aim_kedro.aim.validation import val_batches, validation_loss
from aim_kedro.common.config import from_mapping
from aim_kedro.common.training import cpu_threads, param_groups, warmup_cosine

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("none", "ddp", "fsdp2")
POSITIVE = ("batch_size", "grad_accum_steps", "total_steps", "base_batch_size", "log_every",
            "val_batches")
NON_NEGATIVE = ("warmup_steps", "num_workers", "shuffle_buffer", "checkpoint_every", "keep_every",
                "val_every", "seed")


@dataclass
class TrainConfig:
    """Every knob of a pre-training run (defaults: conf/base ``pretraining.train``).

    ``batch_size`` is the GLOBAL batch per optimizer step (split over ranks and
    ``grad_accum_steps``); ``lr=None`` means ``base_lr * batch_size / base_batch_size`` (1e-3 at
    4096, as in the paper)."""

    preset: str = "aim_sample"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float | None = 2e-3
    base_lr: float = 1e-3
    base_batch_size: int = 4096
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 30
    total_steps: int = 450
    grad_clip: float = 1.0
    compile: bool = False
    grad_checkpointing: bool = False
    attn_backend: str | None = None
    num_workers: int = 1
    shuffle_buffer: int = 1000
    seed: int = 0
    checkpoint_every: int = 50
    keep_every: int = 50
    val_every: int = 25
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

    def model_config_dict(self, model_cfg: AIMConfig) -> dict[str, Any]:
        """What checkpoints store as the model config: the architecture and the preset name."""
        return {**model_cfg.to_dict(), "preset": self.preset}

    def peak_lr(self) -> float:
        """The lr after warm-up: absolute ``lr`` or the linearly scaled base lr."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / self.base_batch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "training") -> TrainConfig:
        """Build from a dict; unknown keys raise ValueError naming them."""
        return from_mapping(cls, data, where)

    def validate(self, world_size: int = 1) -> AIMConfig:
        """Check every knob (ValueError naming the parameter and the fix); return the model config."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown; use one of {sorted(PRESETS)}")
        model_cfg = self.model_config()
        for names, low, what in ((POSITIVE, 1, "a positive integer"),
                                 (NON_NEGATIVE, 0, "an integer >= 0 (0 turns it off)")):
            for name in names:
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ValueError(f"{name} must be {what}, got {value!r}")
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
        checks = (
            (self.lr is None or self.lr > 0, f"lr must be > 0 or null (scale base_lr), got {self.lr}"),
            (self.base_lr > 0, f"base_lr must be > 0, got {self.base_lr}"),
            (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {list(self.betas)}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}"),
            (self.cpu_threads is None or self.cpu_threads >= 1,
             f"cpu_threads must be >= 1 or null (torch's default), got {self.cpu_threads}"),
            (self.stop_at_step is None or self.stop_at_step >= 1,
             f"stop_at_step must be >= 1 or null, got {self.stop_at_step}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS),
                              ("distributed", DISTRIBUTED)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        return model_cfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    return warmup_cosine(step, cfg.total_steps, cfg.warmup_steps, cfg.peak_lr())


def train(
    cfg: TrainConfig, train_source: ShardSource, val_source: ShardSource | None,
    run_dir: str | Path | RunDir,
) -> TrainResult:
    """Pre-train an AIM; resume from ``run_dir/last.pt`` when it exists and ``cfg.resume``."""
    with cpu_threads(cfg.cpu_threads):
        return _train(cfg, train_source, val_source, as_run_dir(run_dir))


def _train(cfg: TrainConfig, train_source: ShardSource, val_source: ShardSource | None,
           run: RunDir) -> TrainResult:
    """The training loop (see :func:`train`)."""
    dist = D.setup(cfg.device, cfg.distributed)
    model_cfg = cfg.validate(dist.world_size)
    model_dict = cfg.model_config_dict(model_cfg)
    run.prepare()
    ckpt = load_resume(run, cfg.total_steps, model_dict, cfg.to_dict()) if cfg.resume else None
    if ckpt is None and dist.main:
        run.clear()
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    model = AIM(model_cfg, grad_checkpointing=cfg.grad_checkpointing).to(dist.device)
    module = D.wrap(model, dist, compile=cfg.compile)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg), betas=cfg.betas,
        fused=dist.device.type == "cuda",
    )
    prefix_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank)
    micro = cfg.batch_size // (dist.world_size * cfg.grad_accum_steps)
    step, history, data_start = 0, [], None
    if ckpt is not None:
        D.load_state(model, optimizer, ckpt["model"], ckpt["optimizer"], dist)
        step, history = int(ckpt["step"]), list(ckpt["history"])
        ranks = ckpt["ranks"]
        if len(ranks) == dist.world_size:
            set_rng_state(ranks[dist.rank], prefix_gen)
            data_start = ranks[dist.rank]["data"]
        else:
            logger.warning("checkpoint has %d ranks, run has %d: data order restarts", len(ranks),
                           dist.world_size)
        if dist.main:
            logger.info("resumed %s at step %d", ckpt["resumed_from"], step)
    loader = ResumableLoader(
        train_source, model_cfg.img_size, micro, seed=cfg.seed, num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer, rank=dist.rank, world_size=dist.world_size,
        start=data_start, pin_memory=dist.device.type == "cuda",
    )
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dist.device.type == "cuda")
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    val_data = val_batches(val_source, model_cfg, micro, cfg.val_batches, dist)
    end_step = min(cfg.total_steps, cfg.stop_at_step or cfg.total_steps)
    n_tok = model_cfg.num_patches

    def evaluate() -> float | None:
        model.eval()
        loss = validation_loss(D.unwrap(module), val_data(), n_tok, cfg.seed + 12345, dist.device,
                               autocast)
        model.train()
        mean, seen = D.reduce_mean([loss or 0.0, 1.0 if loss is not None else 0.0], dist)
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
            model_sd, optim_sd = D.full_state(model, optimizer, dist)
            ranks = D.gather(rng_state(prefix_gen, loader.state_dict()), dist)
            if dist.main and keep:
                atomic_safetensors(model_sd, run.step_file(step))
            if dist.main and save:
                save_last(run, model=model_sd, optimizer=optim_sd, step=step, history=history,
                          ranks=ranks, train_config=cfg.to_dict(), model_config=model_dict)

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
            with D.no_sync(module, sync=i == cfg.grad_accum_steps - 1):
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
            train_loss = D.reduce_mean([float(loss_acc) / (step - last_mark)], dist)[0]
            ips = cfg.batch_size * (step - last_mark) / max(time.perf_counter() - last_time, 1e-9)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            after_step(_row(step, train_loss, lr, D.as_float(grad_norm), ips))
            loss_acc.zero_()
            last_mark, last_time = step, time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - t0
    result = run_result(run, history, D.full_state(model, optimizer, dist)[0], model_dict, step,
                        cfg.batch_size, seconds, dist.world_size)
    if dist.main:
        write_result(run, result, cfg.to_dict())
    D.barrier(dist)
    (logger.info if dist.main else logger.debug)(
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


if __name__ == "__main__":  # the torchrun entry point: python -m aim_kedro.aim.train --config ...
    from aim_kedro.aim.launch import main

    main()
