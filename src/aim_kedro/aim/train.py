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
from aim_kedro.aim.presets import (
    LR_SCALINGS,
    PRESETS,
    RECIPES,
    AIMConfig,
    TrainingRecipe,
    get_config,
)
from aim_kedro.aim.validation import val_batches, validation_loss
from aim_kedro.common.config import from_mapping
from aim_kedro.common.training import cpu_threads, param_groups, warmup_cosine

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("none", "ddp", "fsdp2")
POSITIVE = ("batch_size", "grad_accum_steps", "total_steps", "base_batch_size", "log_every",
            "val_batches")
NON_NEGATIVE = ("num_workers", "shuffle_buffer", "checkpoint_every", "keep_every", "val_every",
                "seed")
RECIPE_KEYS = ("lr", "lr_scaling", "warmup_start_lr")


@dataclass
class TrainConfig:
    """Every knob of a pre-training run (defaults: conf/base ``pretraining.train``).

    ``batch_size`` is the GLOBAL batch per optimizer step (split over ranks and
    ``grad_accum_steps``). The schedule keys left None (``lr``, ``lr_scaling``, ``warmup_steps``
    with ``warmup_fraction``, ``warmup_start_lr``) take the preset's ``TrainingRecipe``
    (``presets.RECIPES``): ml-l3m's for the paper presets, the sample's tuned one for the small
    ones. ``lr_scaling: linear`` runs at ``lr * batch_size / base_batch_size``, ``none`` at
    ``lr`` whatever the batch."""

    preset: str = "aim_sample"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float | None = None
    lr_scaling: str | None = None
    base_batch_size: int = 4096
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    warmup_fraction: float | None = None
    warmup_start_lr: float | None = None
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

    def recipe(self) -> TrainingRecipe:
        """The schedule of this run: the preset's recipe with the keys set here applied (a
        warm-up given as steps or as a fraction replaces the preset's either way)."""
        given = {k: getattr(self, k) for k in RECIPE_KEYS if getattr(self, k) is not None}
        if self.warmup_steps is not None or self.warmup_fraction is not None:
            given.update(warmup_steps=self.warmup_steps, warmup_fraction=self.warmup_fraction)
        return dataclasses.replace(RECIPES[self.preset], **given)

    def peak_lr(self) -> float:
        """The lr after warm-up: the recipe's ``lr``, times ``batch_size / base_batch_size``
        under ``lr_scaling: linear``."""
        recipe = self.recipe()
        scale = self.batch_size / self.base_batch_size if recipe.lr_scaling == "linear" else 1.0
        return recipe.lr * scale

    def warmup(self) -> float:
        """Warm-up length in steps (fractional when given as ``warmup_fraction`` of the run)."""
        recipe = self.recipe()
        if recipe.warmup_steps is not None:
            return float(recipe.warmup_steps)
        return float(recipe.warmup_fraction or 0.0) * self.total_steps

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
        per_step = world_size * self.grad_accum_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by num_gpus x grad_accum_steps "
                f"({per_step}); it is the global batch per optimizer step"
            )
        for name in ("lr", "warmup_fraction", "warmup_start_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if (value is not None or name in ("weight_decay", "grad_clip")) and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ValueError(f"{name} must be a number, got {value!r} (write 1.0e-3, not 1e-3, in YAML)")
        checks = (
            (self.lr is None or self.lr > 0, f"lr must be > 0 or null (the preset's), got {self.lr}"),
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
        self._validate_schedule()
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS),
                              ("distributed", DISTRIBUTED)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        return model_cfg

    def _validate_schedule(self) -> None:
        """Warm-up given once, shorter than the run; a known lr scaling; a start lr >= 0."""
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError("set warmup_steps or warmup_fraction, not both (null takes the preset's)")
        steps = self.warmup_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0 or null, got {steps!r}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1) or null, got {self.warmup_fraction}")
        if self.lr_scaling is not None and self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling must be one of {list(LR_SCALINGS)} or null, got {self.lr_scaling!r}")
        if self.warmup_start_lr is not None and self.warmup_start_lr < 0:
            raise ValueError(f"warmup_start_lr must be >= 0 or null, got {self.warmup_start_lr}")
        if self.warmup() >= self.total_steps:
            recipe = self.recipe()
            key = "warmup_fraction" if recipe.warmup_steps is None else "warmup_steps"
            given = "" if getattr(self, key) is not None else f" of preset {self.preset}"
            raise ValueError(
                f"{key} ({getattr(recipe, key):g}{given}) gives a warm-up of {self.warmup():g} "
                f"steps, not smaller than total_steps ({self.total_steps}); lower {key} or raise "
                "total_steps"
            )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    return warmup_cosine(step, cfg.total_steps, cfg.warmup(), cfg.peak_lr(),
                         cfg.recipe().warmup_start_lr)


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
    if dist.main:
        recipe = cfg.recipe()
        start = "peak/warm-up" if recipe.warmup_start_lr is None else f"{recipe.warmup_start_lr:g}"
        logger.info("%s: peak lr %.3g (lr %g, scaling %s), warm-up %g of %d steps from %s, then "
                    "cosine to 0", cfg.preset, cfg.peak_lr(), recipe.lr, recipe.lr_scaling,
                    cfg.warmup(), cfg.total_steps, start)
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
