"""Distributed plumbing in one process: what the loop calls does no communication and the
same maths, so a single-process run is the world-size-1 case of a torchrun job."""

from __future__ import annotations

import contextlib

import pytest
import torch

from aim_kedro.aim import distributed as D
from aim_kedro.aim.masks import sample_prefix_len
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config


def test_setup_without_torchrun_is_one_cpu_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = D.setup("cpu", "ddp")
    assert (dist.rank, dist.world_size, dist.main, dist.fsdp) == (0, 1, True, False)
    assert dist.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            D.setup("cuda", "none")


def test_collectives_are_identities_alone():
    dist = D.Dist()
    assert D.gather({"a": 1}, dist) == [{"a": 1}]
    assert D.reduce_mean([1.5, 2.0], dist) == [1.5, 2.0]
    assert D.reduce_min(7, dist) == 7
    assert D.as_float(torch.tensor(0.25)) == 0.25
    D.barrier(dist)


def test_wrapped_module_computes_the_aim_loss_and_full_state_is_a_copy():
    torch.manual_seed(0)
    model = AIM(get_config("aim_tiny"))
    dist = D.Dist(strategy="ddp")
    module = D.wrap(model, dist)
    assert D.unwrap(module) is module and module.model is model
    images = torch.randn(2, 3, 16, 16)
    prefix = sample_prefix_len(2, model.cfg.num_patches, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module(images, prefix), model.loss(images, prefix))
    assert isinstance(D.no_sync(module, sync=False), contextlib.nullcontext)
    optimizer = torch.optim.AdamW(model.parameters())
    model_sd, optim_sd = D.full_state(model, optimizer, dist)
    name = "trunk.blocks.0.attn.qkv.weight"
    model_sd[name].zero_()
    assert model.state_dict()[name].abs().sum() > 0
    D.load_state(model, optimizer, model_sd, optim_sd, dist)
    assert model.state_dict()[name].abs().sum() == 0
