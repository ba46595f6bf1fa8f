"""Typed configs of the pretraining and evaluation blocks: one source of truth for defaults,
unknown keys at any depth, keys that became catalog entries, and the checks before a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from aim_kedro.aim.configs import (
    REMOVED,
    EvaluationConfig,
    PretrainingConfig,
    ProbesConfig,
    check_removed,
)

PROJECT = Path(__file__).resolve().parents[2]


def _block(name: str) -> dict[str, Any]:
    return yaml.safe_load((PROJECT / f"conf/base/parameters_{name}.yml").read_text())[name]


def _as_yaml(value: Any) -> Any:
    """A dataclass default as YAML would write it (dataclasses as mappings, tuples as lists)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _as_yaml(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_as_yaml(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_yaml(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize(("name", "cls"), [("pretraining", PretrainingConfig),
                                           ("evaluation", EvaluationConfig)])
def test_each_yaml_block_is_its_dataclass_defaults(name, cls):
    assert _as_yaml(cls()) == _block(name)


def test_unknown_keys_name_the_full_path_and_the_closest_key():
    with pytest.raises(ValueError, match=r"unknown evaluation\.probes\.low_shot parameter\(s\) "
                                         r"\['seed'\] \(did you mean 'seed' -> 'seeds'\?\)"):
        EvaluationConfig.from_params({"probes": {"low_shot": {"seed": [0]}}})
    with pytest.raises(ValueError, match=r"unknown evaluation\.features parameter.*'layer' -> 'layers'"):
        EvaluationConfig.from_params({"features": {"layer": "last6"}})
    with pytest.raises(ValueError, match=r"unknown pretraining\.train parameter.*'warmup' -> "
                                         r"'warmup_steps'"):
        PretrainingConfig.from_params({"train": {"warmup": 3}})


def test_keys_that_became_catalog_entries_name_the_entry():
    assert set(REMOVED) == {"pretraining.run_dir", "pretraining.secondary_shards",
                            "evaluation.trunk.source", "evaluation.trunk.path",
                            "evaluation.dataset.kind", "evaluation.dataset.train_path",
                            "evaluation.dataset.test_path", "pretraining.train.base_lr"}
    with pytest.raises(ValueError, match=r"evaluation\.dataset\.kind and evaluation\.dataset\."
                                         r"train_path are no longer parameters: .*probe_train"):
        check_removed({"dataset": {"kind": "image_folder", "train_path": "/x"}}, "evaluation")
    with pytest.raises(ValueError, match="`secondary_pool`"):
        PretrainingConfig.from_params({"secondary_shards": None})
    with pytest.raises(ValueError, match=r"pretraining\.train\.base_lr is no longer.*lr_scaling: linear"):
        PretrainingConfig.from_params({"train": {"base_lr": 1e-3}})
    check_removed({"dataset": {"num_classes": 10}, "trunk": None}, "evaluation")


def test_checks_before_a_run_name_the_parameter():
    with pytest.raises(ValueError, match=r"pretraining\.train: warmup_steps \(500\)"):
        PretrainingConfig.from_params({"train": {"warmup_steps": 500}})
    with pytest.raises(ValueError, match=r"pretraining\.num_gpus"):
        PretrainingConfig.from_params({"num_gpus": 0})
    with pytest.raises(ValueError, match=r"evaluation\.probes\.cpu_threads"):
        EvaluationConfig.from_params({"probes": {"cpu_threads": 0}})
    with pytest.raises(ValueError, match=r"evaluation\.features\.batch_size"):
        EvaluationConfig.from_params({"features": {"batch_size": 0}})
    with pytest.raises(ValueError, match=r"evaluation\.probes must be a mapping"):
        EvaluationConfig.from_params({"probes": [1, 2]})
    assert EvaluationConfig.from_params({"device": "cpu"}).device == "cpu"


def test_probes_block_is_the_protocol_the_probes_run():
    protocol = ProbesConfig(kinds=["linear"], lrs={"linear": [1, 2]}, epochs=3).protocol("cpu")
    assert protocol.kinds == ("linear",) and protocol.lrs["linear"] == [1.0, 2.0]
    assert protocol.training.epochs == 3 and protocol.training.device == "cpu"
    assert protocol.training_for("linear").weight_decay == 0.0
