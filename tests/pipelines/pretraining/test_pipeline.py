"""The pretraining pipeline: parameter checks, its catalog, and a short run on an in-memory catalog."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from kedro.io import DataCatalog, MemoryDataset, Version
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure
from PIL import Image

from aim_kedro.aim.checkpoint import RunDir
from aim_kedro.aim.configs import PretrainingConfig
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config
from aim_kedro.aim.train import TrainConfig
from aim_kedro.datasets import (
    AIMCheckpointDataset,
    CheckpointSeriesDataset,
    PretrainingRunDataset,
    WebDatasetShards,
)
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.pipelines.pretraining import create_pipeline
from aim_kedro.pipelines.pretraining.nodes import (
    plot_loss_curve,
    validate_pretraining_params,
)

PROJECT = Path(__file__).resolve().parents[3]
PARAMS = yaml.safe_load((PROJECT / "conf/base/parameters_pretraining.yml").read_text())["pretraining"]
OUTPUTS = ("aim_checkpoint", "aim_intermediate_checkpoints", "training_history", "loss_curve")
INPUTS = ("pretraining_run", "secondary_pool")


class KeptDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so the test can read intermediate outputs."""

    def _release(self) -> None:
        pass


def params(**train) -> dict:
    out = copy.deepcopy(PARAMS)
    out["train"].update(train)
    return out


def _shards(out_dir: Path, n: int = 60, size: int = 24) -> ShardSet:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size] / size
        img = rng.uniform(0, 1, 3) * xx[..., None] + rng.uniform(0, 1, 3) * yy[..., None]
        buf = io.BytesIO()
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, fmt)
        samples.append({"__key__": f"{i:06d}", ext: buf.getvalue(), "txt": f"image {i}",
                        "json": {"uid": f"{i:032x}", "source": "test"}})
    write_shards(samples, str(out_dir), samples_per_shard=20)
    return ShardSet.open(str(out_dir))


def test_shipped_parameters_validate():
    settings = validate_pretraining_params(PARAMS)
    assert isinstance(settings, PretrainingConfig) and isinstance(settings.train, TrainConfig)
    assert settings.train.preset == "aim_sample"
    assert settings.num_gpus == 1


def test_dataclass_defaults_are_the_shipped_parameters():
    """One source of truth: conf/base's block is what the dataclasses default to."""
    defaults = PretrainingConfig()
    assert validate_pretraining_params({}) == defaults
    assert validate_pretraining_params(PARAMS) == defaults
    for key, value in PARAMS["train"].items():
        default = getattr(defaults.train, key)
        assert (list(default) if isinstance(default, tuple) else default) == value, key


@pytest.mark.parametrize(("key", "entry"), [("run_dir", "pretraining_run"),
                                            ("secondary_shards", "secondary_pool")])
def test_parameters_that_became_catalog_entries_fail_naming_the_entry(key, entry):
    with pytest.raises(ValueError, match=rf"pretraining\.{key} is no longer a parameter.*`{entry}`"):
        validate_pretraining_params({**PARAMS, key: "data/06_models/pretraining_run"})


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"train": {"preset": "aim_12B"}}, "preset"),
        ({"train": {"model_overrides": {"img_size": 30}}}, "patch_size"),
        ({"train": {"batch_size": 0}}, "batch_size"),
        ({"train": {"lr": "2e-3"}}, "lr"),
        ({"train": {"warmup_steps": 500}}, "warmup_steps"),
        ({"train": {"learning_rate": 1.0}}, "learning_rate"),
        ({"num_gpus": 0}, "num_gpus"),
        ({"num_gpus": 3}, "num_gpus x grad_accum_steps"),
        ({"val_percent": 100}, "val_percent"),
        ({"secondary_shards": "/no/such/imagenet"}, "secondary_shards"),
        ({"secondary_p": 1.5}, "secondary_p"),
        ({"epochs": 3}, "epochs"),
        ({"train": {"keep_evry": 3}}, r"pretraining\.train parameter.*'keep_evry' -> 'keep_every'"),
    ],
)
def test_bad_parameters_are_named(change, named):
    bad = copy.deepcopy(PARAMS)
    for key, value in change.items():
        if isinstance(value, dict):
            bad[key].update(value)
        else:
            bad[key] = value
    with pytest.raises(ValueError, match=named):
        validate_pretraining_params(bad)


def test_pipeline_shape():
    pipe = create_pipeline()
    assert [n.name for n in pipe.nodes][0] == "validate_pretraining_params"
    assert {n.name for n in pipe.nodes} == {"validate_pretraining_params", "pretrain_aim",
                                            "plot_loss_curve"}
    assert pipe.inputs() == {"dfn_subset", "params:pretraining", *INPUTS}
    assert pipe.all_outputs() == {*OUTPUTS, "pretraining_settings"}
    assert all("pretraining" in n.tags for n in pipe.nodes)


def test_catalog_entries_are_versioned_and_cover_the_outputs():
    entries = yaml.safe_load((PROJECT / "conf/base/catalog_pretraining.yml").read_text())
    assert set(entries) == {*OUTPUTS, *INPUTS}
    assert all(entries[name].get("versioned") is True for name in OUTPUTS)
    assert not any(entries[name].get("versioned") for name in INPUTS)
    catalog = DataCatalog.from_config(entries)
    assert isinstance(catalog["aim_checkpoint"], AIMCheckpointDataset)
    assert isinstance(catalog["aim_intermediate_checkpoints"], CheckpointSeriesDataset)
    assert isinstance(catalog["pretraining_run"], PretrainingRunDataset)
    assert isinstance(catalog["secondary_pool"], WebDatasetShards)


def test_plot_loss_curve_handles_missing_values():
    history = pl.DataFrame(
        {"step": [0, 10, 20], "train_loss": [None, 0.9, 0.7], "val_loss": [1.0, None, 0.8],
         "lr": [1e-4, 1e-3, 5e-4], "grad_norm": [None, 1.0, 0.5], "images_per_s": [None, 50.0, 60.0]},
        schema_overrides={"train_loss": pl.Float64, "grad_norm": pl.Float64,
                          "images_per_s": pl.Float64},
    )
    fig = plot_loss_curve(history)
    assert isinstance(fig, Figure)
    assert "1.000 -> 0.800" in fig.axes[0].get_title()


@pytest.mark.slow
def test_pretraining_pipeline_end_to_end(tmp_path):
    shard_set = _shards(tmp_path / "dfn_subset")
    run_params = params(
        preset="aim_tiny", batch_size=8, total_steps=6, warmup_steps=2,
        checkpoint_every=3, keep_every=3, val_every=3, val_batches=2, log_every=2, num_workers=0,
        device="cpu", progress=False,
    )
    run_params["val_percent"] = 20.0
    run_dir = PretrainingRunDataset(filepath=str(tmp_path / "run"))
    datasets = {
        "dfn_subset": MemoryDataset(shard_set, copy_mode="assign"),
        "secondary_pool": WebDatasetShards(filepath=str(tmp_path / "no_pool"), missing_ok=True),
        "pretraining_run": run_dir,
        "params:pretraining": MemoryDataset(run_params),
        "pretraining_settings": MemoryDataset(),
    }
    for name in OUTPUTS:
        datasets[name] = KeptDataset(copy_mode="assign")
    catalog = DataCatalog(datasets=datasets)
    SequentialRunner().run(create_pipeline(), catalog)

    checkpoint = catalog["aim_checkpoint"].load()
    assert checkpoint["config"]["preset"] == "aim_tiny"
    assert checkpoint["config"]["img_size"] == get_config("aim_tiny").img_size
    model = AIM(get_config("aim_tiny"))
    model.load_state_dict(checkpoint["state_dict"])
    assert checkpoint["metadata"]["steps"] == 6 and checkpoint["metadata"]["images_seen"] == 48
    assert checkpoint["metadata"]["final_val_loss"] is not None

    series = catalog["aim_intermediate_checkpoints"].load()
    assert sorted(series["checkpoints"]) == [0, 3, 6]
    step6 = series["checkpoints"][6]()
    assert torch.equal(step6["head.out.weight"], checkpoint["state_dict"]["head.out.weight"])

    history = catalog["training_history"].load()
    assert history.columns == ["step", "train_loss", "val_loss", "lr", "grad_norm", "images_per_s"]
    assert history["step"].to_list() == [0, 2, 3, 4, 6]
    assert history.filter(pl.col("step").is_in([0, 3, 6]))["val_loss"].null_count() == 0
    assert isinstance(catalog["loss_curve"].load(), Figure)

    # the series saves through the catalog dataset, reading each step lazily from the run dir
    saved = CheckpointSeriesDataset(filepath=str(tmp_path / "series"), version=Version(None, None))
    saved.save(series)
    assert saved.load()["steps"] == [0, 3, 6]
    assert checkpoint["metadata"]["run_dir"] == str(tmp_path / "run")
    assert RunDir(tmp_path / "run").summary()["kept_steps"] == [0, 3, 6]
    assert '"last_step": 6' in run_dir.preview()


def test_secondary_pool_is_mixed_in_only_when_it_holds_shards(tmp_path):
    from aim_kedro.pipelines.pretraining.nodes import pretrain_aim

    dfn = _shards(tmp_path / "dfn_subset", n=24)
    imagenet = _shards(tmp_path / "imagenet", n=24, size=20)
    settings = PretrainingConfig(val_percent=0.0, secondary_p=1.0, train=TrainConfig(
        preset="aim_tiny", batch_size=8, total_steps=2, warmup_steps=1, checkpoint_every=0,
        keep_every=0, val_every=0, num_workers=0, device="cpu", progress=False, resume=False))
    empty = WebDatasetShards(filepath=str(tmp_path / "absent"), missing_ok=True).load()
    runs = {}
    for name, pool in (("none", empty), ("mixed", imagenet), ("none_again", empty)):
        checkpoint, _, _ = pretrain_aim(dfn, pool, RunDir(tmp_path / name), settings)
        runs[name] = checkpoint["state_dict"]["trunk.blocks.0.attn.qkv.weight"]
    assert torch.equal(runs["none"], runs["none_again"])
    assert not torch.equal(runs["none"], runs["mixed"])
