"""Training helpers shared by every optimisation loop (AIM, probes, the DFN filtering network).

One rule for AdamW parameter groups, one warm-up + cosine schedule and one way to run a block
with a given number of torch threads, so the three loops cannot drift apart.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "position")


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = NO_DECAY_NAMES
) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; none on biases, norms (any parameter of
    fewer than 2 dimensions) or a parameter whose name contains one of ``no_decay_names``.
    Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(part in name for part in no_decay_names):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: float, peak: float = 1.0, start: float | None = None
) -> float:
    """Value at optimiser step ``step`` (0-based): linear warm-up to ``peak`` over
    ``warmup_steps`` (a float for a fraction of a run), then a cosine to 0 at ``total_steps``.
    ``peak=1`` gives the factor a ``LambdaLR`` multiplies the base lr by.

    The warm-up is ``peak * (step + 1) / warmup_steps`` without ``start``; with it, a line from
    ``start`` at step 0 that reaches ``peak`` at ``warmup_steps`` (fvcore's LinearParamScheduler,
    as ml-l3m composes it with the cosine)."""
    if step < warmup_steps:
        if start is None:
            return peak * (step + 1) / warmup_steps
        return start + (peak - start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads (None: unchanged), restored afterwards.

    Small steps on a busy CPU run faster on one thread than on several that wait for each other.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["NO_DECAY_NAMES", "cpu_threads", "param_groups", "warmup_cosine"]
