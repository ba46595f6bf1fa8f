"""Distributed plumbing of pre-training: the process group, DDP / FSDP2 wrapping, gradient sync,
full state dicts and the collectives the loop needs. One process (``world_size == 1``) runs the
same calls, which then do no communication.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aim_kedro.aim.model import AIM


class LossModule(nn.Module):
    """Makes ``AIM.loss`` the forward pass, so DDP/FSDP hooks and torch.compile see it."""

    def __init__(self, model: AIM) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        return self.model.loss(images, prefix_len)


@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank, device, and the
    strategy (``ddp`` or ``fsdp2``; ``none`` alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"

    @property
    def fsdp(self) -> bool:
        """Whether the model is sharded with FSDP2 over several ranks."""
        return self.strategy == "fsdp2" and self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes files)."""
        return self.rank == 0


def setup(device: str, distributed: str) -> Dist:
    """Resolve the device and, under torchrun, initialise the process group from the env."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device: auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed == "none" or world == 1:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank, world, local_rank, dev, distributed)


def wrap(model: AIM, dist: Dist, compile: bool = False) -> nn.Module:
    """The module the loop calls: loss wrapper, compiled if asked, under DDP or FSDP2."""
    module: nn.Module = LossModule(model)
    if dist.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.trunk.blocks) + list(model.head.blocks):
            fully_shard(block)
        fully_shard(module)
    if compile:
        module = torch.compile(module)
    if dist.strategy == "ddp" and dist.world_size > 1:
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP (evaluation runs without DDP's hooks)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def no_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not sync:
        return module.no_sync()
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(sync)
    return contextlib.nullcontext()


def full_state(
    model: AIM, optimizer: torch.optim.Optimizer, dist: Dist
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded, CPU) model and optimizer state dicts; a collective under FSDP2."""
    if dist.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
    model_sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return model_sd, optimizer.state_dict()


def load_state(model: AIM, optimizer: torch.optim.Optimizer, model_sd: dict[str, Any],
               optim_sd: dict[str, Any], dist: Dist) -> None:
    """Load full state dicts into the (possibly sharded) model and optimizer."""
    if dist.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def gather(obj: Any, dist: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if dist.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def reduce_mean(values: list[float], dist: Dist) -> list[float]:
    """The mean of ``values`` over ranks."""
    if dist.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return (t / dist.world_size).tolist()


def reduce_min(value: int, dist: Dist) -> int:
    """The smallest ``value`` over ranks."""
    if dist.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def as_float(value: torch.Tensor) -> float:
    """A scalar tensor (a DTensor under FSDP2: its full value) as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op alone)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


def destroy() -> None:
    """End the process group if one was started."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
