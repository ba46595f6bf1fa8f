"""Loss vs accuracy over a run's kept steps: step picking, the history look-up, the study."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from aim_kedro.aim.configs import (
    FeaturesConfig,
    LossVsAccuracyConfig,
    LowShotConfig,
    ProbesConfig,
)
from aim_kedro.aim.evalsets import LabelledSet
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config
from aim_kedro.aim.studies import (
    decode_labelled,
    loss_vs_accuracy,
    pick_steps,
    spearman,
    val_loss_at,
)


def test_pick_steps_spreads_evenly_and_keeps_first_and_last():
    steps = list(range(0, 451, 50))
    assert pick_steps(steps, None) == steps and pick_steps(steps, 20) == steps
    assert pick_steps(steps, 1) == [450]
    assert pick_steps(steps, 4) == [0, 150, 300, 450]
    assert pick_steps([30, 10, 20], 2) == [10, 30]


def test_val_loss_at_takes_the_step_s_last_validation():
    history = pl.DataFrame({"step": [0, 10, 10, 20], "val_loss": [1.0, None, 0.5, None]})
    assert val_loss_at(history, 0) == 1.0 and val_loss_at(history, 10) == 0.5
    assert val_loss_at(history, 20) is None and val_loss_at(history, 30) is None


def test_spearman_needs_three_points():
    assert spearman(pl.DataFrame({"val_loss": [1.0, 0.5], "top1": [0.1, 0.2]})) == (None, None)
    assert spearman(pl.DataFrame({"val_loss": [1.0, 0.8, 0.5], "top1": [0.2] * 3})) == (None, None)
    rho, p = spearman(pl.DataFrame({"val_loss": [1.0, 0.8, 0.5, 0.4], "top1": [0.1, 0.2, 0.3, 0.5]}))
    assert rho == pytest.approx(-1.0) and 0.0 <= p <= 1.0


def _labelled(name: str, per_class: int, seed: int, size: int = 16) -> LabelledSet:
    rng = np.random.default_rng(seed)
    items = []
    for label in range(3):
        for i in range(per_class):
            img = np.zeros((size, size, 3), np.uint8)
            img[..., label] = 200
            img = (img + rng.integers(0, 40, img.shape)).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            items.append((f"{label}-{i}", buf.getvalue(), label))
    return LabelledSet(name=name, source=name, classes=["r", "g", "b"],
                       _iterate=lambda: iter(items), size=len(items))


def test_decode_labelled_gives_every_image_in_the_eval_view():
    images, labels = decode_labelled(_labelled("train", 2, 0, size=24), img_size=16, batch_size=4)
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_loss_vs_accuracy_probes_each_step_with_a_val_loss():
    cfg = get_config("aim_tiny")
    torch.manual_seed(0)
    series = {step: AIM(cfg).state_dict() for step in (10, 20, 30, 40)}
    loaded = []

    def load(step: int):
        loaded.append(step)
        return series[step]

    history = pl.DataFrame({"step": [10, 20, 30, 40], "val_loss": [0.9, 0.7, None, 0.5]})
    sets = {"train": _labelled("train", 6, 0), "test": _labelled("test", 3, 1)}
    probes = ProbesConfig(epochs=1, min_steps=5, batch_size=8, low_shot=LowShotConfig(2, [0, 1]))
    table, summary = loss_vs_accuracy(
        cfg, sorted(series), load, history, sets,
        LossVsAccuracyConfig(kind="attentive", lr=1e-2, shots=2, max_checkpoints=None),
        FeaturesConfig(layers="last6", batch_size=8), probes,
    )
    assert table.columns == ["step", "val_loss", "top1"]
    assert table["step"].to_list() == [10, 20, 40] and loaded == [10, 20, 40]
    assert table["val_loss"].to_list() == [0.9, 0.7, 0.5]
    assert all(0.0 <= v <= 1.0 for v in table["top1"].to_list())
    assert summary["n"] == 3 and summary["steps"] == [10, 20, 40] and summary["layers"] == [0, 1]
    assert summary["spearman"] is None or -1.0 <= summary["spearman"] <= 1.0
    assert summary["probe"] == ("attentive probe, fixed lr 0.01, 2-shot (mean over seeds [0, 1]), "
                                "test top-1")
