"""The shared training helpers: AdamW groups, warm-up + cosine, thread control."""

import math

import torch
from torch import nn

from aim_kedro.common.training import cpu_threads, param_groups, warmup_cosine


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 3))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 3))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_param_groups_decay_only_weight_matrices() -> None:
    net = _Net()
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(tuple(p.shape) for p in decay["params"]) == [(1, 1, 3), (3, 4)]
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {"fc.bias", "norm.weight", "norm.bias",
                                                        "pos_embed"}
    _, no_decay = param_groups(net, 0.05, no_decay_names=("token",))
    assert "cls_token" in {names[id(p)] for p in no_decay["params"]}


def test_warmup_cosine_rises_linearly_then_falls_to_zero() -> None:
    assert warmup_cosine(0, 100, 10, peak=2.0) == 2.0 * 1 / 10
    assert warmup_cosine(9, 100, 10, peak=2.0) == 2.0
    assert math.isclose(warmup_cosine(55, 100, 10, peak=2.0), 1.0)
    assert warmup_cosine(100, 100, 10) == 0.0 and warmup_cosine(500, 100, 10) == 0.0
    assert warmup_cosine(0, 10, 0) == 1.0


def test_cpu_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
