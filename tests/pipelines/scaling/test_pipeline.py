"""The scaling pipeline: its parameters, its shape (namespaces of the reused nodes), its catalog,
the grid read from the project's conf, and a 2x2 grid of tiny models end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import noise_png, write_tiny_shards
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from aim_kedro.aim.configs import FeaturesConfig, PretrainingConfig, ProbesConfig
from aim_kedro.aim.scaling import ScalingConfig, model_size
from aim_kedro.datasets import WebDatasetShards
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.io.uids import sample_uid
from aim_kedro.pipelines.evaluation.nodes import extract_probe_features, train_probes
from aim_kedro.pipelines.pretraining.nodes import pretrain_aim
from aim_kedro.pipelines.scaling import create_pipeline
from aim_kedro.pipelines.scaling.nodes import built_shape, validate_scaling_params
from aim_kedro.pipelines.scaling.pipeline import project_grid

PROJECT = Path(__file__).resolve().parents[3]


def _block(name: str) -> dict:
    return yaml.safe_load((PROJECT / f"conf/base/parameters_{name}.yml").read_text())[name]


SCALING, PRETRAINING, EVALUATION = _block("scaling"), _block("pretraining"), _block("evaluation")
SAMPLE = SCALING["grids"]["sample"]
FAST_EVALUATION = {
    "device": "cpu",
    "features": {"batch_size": 64},
    "probes": {"lrs": {"attentive": [3e-3], "linear": [1e-2]}, "epochs": 2, "min_steps": 10,
               "batch_size": 16, "low_shot": {"shots": 2, "seeds": [0, 1]}},
}
TINY_TRAIN = {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "val_every": 4, "val_batches": 2,
              "log_every": 2, "num_workers": 0, "shuffle_buffer": 16, "device": "cpu",
              "progress": False}


def with_grid(grid: dict, name: str = "sample") -> dict:
    """``params:scaling`` that runs ``grid``."""
    return {"grid": name, "grids": {**SCALING["grids"], name: grid}}


def tiny_grid() -> dict:
    """``params:scaling`` of 2 capacities x 2 data sizes x 1 seed of aim_tiny models, 8 steps."""
    return with_grid({
        "capacities": {"t16": {"preset": "aim_tiny", "model_overrides": {"embed_dim": 16}},
                       "t32": {"preset": "aim_tiny"}},
        "data_sizes": {"half": 0.5, "all": 1.0},
        "seeds": [0],
        "steps": 8,
        "pretraining": {"val_percent": 25.0, "train": TINY_TRAIN},
        "evaluation": FAST_EVALUATION,
    }, "tiny")




def test_shipped_parameters_are_the_defaults_and_span_the_grid_the_issue_asks_for():
    grid = ScalingConfig.from_params(SCALING)
    assert SCALING["grid"] == "sample" and grid.where == "scaling.grids.sample"
    assert grid == ScalingConfig() == ScalingConfig.from_params(None)
    params = sorted(model_size(c.model_config())["trunk_params"] for c in grid.capacities.values())
    assert len(params) >= 4 and params[-1] >= 8 * params[0]
    assert len(grid.data_sizes) >= 3 and len(grid.seeds) >= 2
    for capacity in grid.capacities.values():  # every point is a valid pretraining run
        PretrainingConfig.from_params({**PRETRAINING, "train": {
            **PRETRAINING["train"], "preset": capacity.preset,
            "model_overrides": capacity.model_overrides, "total_steps": grid.steps}})


def test_the_parameter_check_hands_each_point_its_settings():
    grid = ScalingConfig.from_params(SCALING)
    out = validate_scaling_params(SCALING, PRETRAINING, EVALUATION, shape=built_shape(grid))
    for point in grid.points():
        settings = out[f"point.{point.capacity}.{point.run}"]
        capacity = grid.capacities[point.capacity]
        assert settings.train.preset == capacity.preset
        assert settings.train.model_overrides == capacity.model_overrides
        assert settings.train.seed == point.seed and settings.train.total_steps == grid.steps
        assert settings.val_percent == SAMPLE["pretraining"]["val_percent"]
        assert settings.train.batch_size == PRETRAINING["train"]["batch_size"]  # inherited
    assert out["data.d25"] == {"name": "d25", "size": 0.25, "val_percent": 10.0,
                               "where": "scaling.grids.sample.data_sizes.d25"}
    assert isinstance(out["eval.features"], FeaturesConfig)
    probes = out["eval.probes"]
    assert isinstance(probes, ProbesConfig) and probes.epochs == SAMPLE["evaluation"]["probes"]["epochs"]
    assert probes.low_shot.shots == EVALUATION["probes"]["low_shot"]["shots"]  # inherited
    assert out["eval.device"] in ("cpu", "cuda")


@pytest.mark.parametrize("change", [{"seeds": [0, 1, 2]}, {"data_sizes": {"d06": 0.0625,
                                                                         "d25": 0.25,
                                                                         "d100": 0.9}}])
def test_parameters_of_another_shape_than_the_built_grid_fail(change):
    shape = built_shape(ScalingConfig.from_params(SCALING))
    with pytest.raises(ValueError, match="parameters_scaling.yml when the project loads"):
        validate_scaling_params(with_grid({**SAMPLE, **change}), PRETRAINING, EVALUATION,
                                shape=shape)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"step": 10}, r"unknown S parameter.*'step' -> 'steps'"),
        ({"data_sizes": {"d1": 1}}, r"S\.data_sizes\.d1 is 1"),
        ({"data_sizes": {"d1": 1.5}}, r"S\.data_sizes\.d1 is 1\.5"),
        ({"data_sizes": {"d1": "all"}}, r"S\.data_sizes\.d1 is 'all'"),
        ({"data_sizes": {}}, r"S\.data_sizes must map"),
        ({"capacities": {"big": {"preset": "aim_9B"}}}, r"S\.capacities\.big.*aim_9B"),
        ({"capacities": {"big": {"preset": "aim_tiny", "model_overrides": {"width": 8}}}},
         r"S\.capacities\.big.*width"),
        ({"capacities": {"big": {"presets": "aim_tiny"}}}, r"S\.capacities\.big parameter"),
        ({"capacities": {"w.32": {"preset": "aim_tiny"}}}, r"S\.capacities\.w\.32: a name"),
        ({"capacities": {"data": {"preset": "aim_tiny"}}}, r"S\.capacities\.data: a name"),
        ({"seeds": [0, 0]}, r"S\.seeds \[0, 0\] repeats"),
        ({"seeds": []}, r"S\.seeds"),
        ({"steps": 0}, r"S\.steps is 0"),
        ({"pretraining": {"train": {"seed": 3}}}, r"S\.pretraining\.train\.seed is set by"),
    ],
)
def test_bad_scaling_parameters_are_named(change, named):
    with pytest.raises(ValueError, match=named.replace("S", r"scaling\.grids\.sample")):
        ScalingConfig.from_params(with_grid({**SAMPLE, **change}))


def test_the_grid_must_be_one_of_the_grids_and_the_paper_grid_is_valid():
    with pytest.raises(ValueError, match=r"scaling\.grid is 'papers' but scaling\.grids holds "
                                         r"\['paper', 'sample'\]"):
        ScalingConfig.from_params({**SCALING, "grid": "papers"})
    with pytest.raises(ValueError, match=r"unknown scaling parameter.*'grid_name'"):
        ScalingConfig.from_params({**SCALING, "grid_name": "paper"})
    paper = ScalingConfig.from_params({**SCALING, "grid": "paper"})
    params = sorted(model_size(c.model_config())["trunk_params"] for c in paper.capacities.values())
    assert params[0] > 6e8 and params[-1] > 6e9
    assert [paper.whole(d) for d in paper.data_sizes] == [False, False, True]
    settings = paper.point_pretraining(paper.points()[-1], PRETRAINING)
    assert settings.num_gpus == 8 and settings.train.preset == "aim_7B"  # each under torchrun
    assert settings.train.total_steps == paper.steps and settings.train.lr is None


def test_a_point_that_cannot_train_names_the_point_and_the_block():
    grid = ScalingConfig.from_params(with_grid({**SAMPLE, "steps": 10}))
    with pytest.raises(ValueError, match=r"scaling point w32/d06/s0 \(scaling\.grids\.sample\."
                                         r"pretraining over .*warmup_steps \(20\)"):
        grid.point_pretraining(grid.points()[0], PRETRAINING)
    bad = with_grid({**SAMPLE, "evaluation": {"probes": {"epoch": 3}}})
    with pytest.raises(ValueError, match=r"grids\.sample\.evaluation .*evaluation\.probes param"):
        ScalingConfig.from_params(bad).probe_evaluation(EVALUATION)


def test_each_point_is_a_namespace_of_the_pretraining_and_evaluation_nodes():
    grid = ScalingConfig.from_params(tiny_grid())
    pipe = create_pipeline(grid=grid)
    assert pipe.inputs() == {"params:scaling", "params:pretraining", "params:evaluation",
                             "dfn_subset", "secondary_pool", "probe_train", "probe_test",
                             *(f"scaling.{p.capacity}.{p.run}.pretraining_run"
                               for p in grid.points())}
    assert {"scaling_results", "scaling_summary", "scaling_curves", "scaling_loss_plot",
            "scaling_probe_plot", "scaling_curves_plot"} <= pipe.all_outputs()
    by_name = {n.name: n for n in pipe.nodes}
    for point in grid.points():
        ns = f"scaling.{point.capacity}.{point.run}"
        train = by_name[f"{ns}.pretrain_aim"]
        assert train.func is pretrain_aim and train.namespace == ns
        shards = "dfn_subset" if point.data == "all" else f"scaling.data.{point.data}.subset"
        assert train.inputs == [shards, "secondary_pool", f"{ns}.pretraining_run",
                                f"{ns}.pretraining_settings"]
        assert by_name[f"{ns}.extract_probe_features"].func is extract_probe_features
        assert by_name[f"{ns}.train_probes"].outputs == [f"{ns}.probe_metrics"]
        assert by_name[f"{ns}.train_probes"].func is train_probes
    assert by_name["scaling.data.half.take_data_size"].outputs == [
        "scaling.data.half.subset", "scaling.data.half.data_size"]
    assert by_name["scaling.data.all.count_data_size"].outputs == ["scaling.data.all.data_size"]
    assert "scaling.data.all.subset" not in pipe.datasets(), "all of dfn_subset is not copied"
    assert all("scaling" in n.tags and n.namespace.startswith("scaling") for n in pipe.nodes)
    roots = [n.name for n in pipe.nodes if set(n.inputs) <= pipe.inputs()]
    assert roots == ["scaling.validate_scaling_params"], "nothing runs before the grid's check"


def _catalog_entries(root: Path) -> dict:
    entries = yaml.safe_load((PROJECT / "conf/base/catalog_scaling.yml").read_text())
    for entry in entries.values():
        if "filepath" in entry:
            entry["filepath"] = str(root / entry["filepath"])
    return entries


def test_every_dataset_of_a_point_has_a_versioned_catalog_entry(tmp_path):
    grid = ScalingConfig.from_params(tiny_grid())
    pipe = create_pipeline(grid=grid)
    catalog = DataCatalog.from_config(_catalog_entries(tmp_path))
    memory = ("eval_trunk", "probe_features", "random_init_features", "eval_sets",
              "pretraining_settings", "data_settings", "_config", "eval_device")
    for name in sorted(pipe.datasets()):
        if name.startswith("params:") or name in ("dfn_subset", "secondary_pool", "probe_train",
                                                   "probe_test"):
            continue
        if name.endswith(memory):
            continue
        dataset = catalog.get(name)
        assert dataset is not None, f"{name} has no catalog entry"
        if not name.endswith("pretraining_run"):
            assert getattr(dataset, "_version", None) is not None, f"{name} is not versioned"
        assert str(tmp_path) in str(dataset._describe()["filepath"]), name


def test_the_grid_is_read_from_the_project_conf_and_a_bad_one_leaves_the_check(
    tmp_path, make_project_copy, monkeypatch, caplog
):
    root = make_project_copy(tmp_path / "project")
    monkeypatch.chdir(root)
    local = root / "conf" / "local" / "parameters_scaling.yml"
    local.write_text(yaml.safe_dump({"scaling": {"grids": {"sample": {"seeds": [7]}}}}))
    grid = project_grid()  # conf/local merges into base, as settings.py merges parameters
    assert grid.seeds == [7] and list(grid.capacities) == list(SAMPLE["capacities"])
    pipe = create_pipeline()
    assert len([n for n in pipe.nodes if n.name.endswith(".pretrain_aim")]) == 4 * 3
    local.write_text(yaml.safe_dump({"scaling": {"grid": "mine", "grids": {"mine": {
        "capacities": {"a": {"preset": "aim_tiny"}}, "data_sizes": {"d50": 0.5}}}}}))
    assert [p.label for p in project_grid().points()] == ["a/d50/s0", "a/d50/s1"]
    monkeypatch.setenv("KEDRO_ENV", "other")  # an env replaces conf/local
    (root / "conf" / "other").mkdir()
    assert project_grid() == ScalingConfig()
    monkeypatch.delenv("KEDRO_ENV")
    local.write_text(yaml.safe_dump({"scaling": {"grids": {"sample": {"data_sizes": {"d50": 1.5}}}}}))
    with caplog.at_level(logging.WARNING):
        broken = create_pipeline()
    assert [n.name for n in broken.nodes] == ["scaling.validate_scaling_params"]
    assert "scaling.grids.sample.data_sizes.d50 is 1.5" in caplog.text


def test_scaling_is_registered_outside_the_default_run(tmp_path, make_project_copy, monkeypatch):
    root = make_project_copy(tmp_path / "project")
    monkeypatch.chdir(root)
    bootstrap_project(root)
    from aim_kedro.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    assert "scaling" in pipelines and len(pipelines["scaling"].nodes) > 100
    assert not any("scaling" in n.tags for n in pipelines["__default__"].nodes)


def _labelled(root: Path, name: str, per_class: int) -> ShardSet:
    samples = [{"__key__": f"{name}{c}{i:02d}", "png": noise_png(100 * c + i, 16), "cls": str(c)}
               for c in range(3) for i in range(per_class)]
    write_shards(samples, str(root / name), samples_per_shard=64)
    return ShardSet.open(str(root / name))


@pytest.mark.slow
def test_a_2x2_grid_of_tiny_models_runs_end_to_end(tmp_path):
    params = tiny_grid()
    grid = ScalingConfig.from_params(params)
    write_tiny_shards(tmp_path / "dfn_subset", n=64, size=20, per_shard=16)
    catalog = DataCatalog.from_config(_catalog_entries(tmp_path), load_versions={})
    for name, value in {
        "params:scaling": params, "params:pretraining": PRETRAINING,
        "params:evaluation": EVALUATION,
        "dfn_subset": ShardSet.open(str(tmp_path / "dfn_subset")),
        "probe_train": _labelled(tmp_path, "train", 6), "probe_test": _labelled(tmp_path, "test", 3),
    }.items():
        catalog[name] = MemoryDataset(value, copy_mode="assign")
    catalog["secondary_pool"] = WebDatasetShards(filepath=str(tmp_path / "none"), missing_ok=True)
    SequentialRunner().run(create_pipeline(grid=grid), catalog)

    results = catalog.load("scaling_results")
    assert results.height == 4 and set(results["point"]) == {
        f"{c}/{d}/s0" for c in ("t16", "t32") for d in ("half", "all")}
    sizes = {c: model_size(grid.capacities[c].model_config()) for c in grid.capacities}
    for row in results.iter_rows(named=True):
        assert row["trunk_params"] == sizes[row["capacity"]]["trunk_params"]
        assert row["steps"] == 8 and row["images_seen"] == 64
        assert row["final_val_loss"] > 0
        for probe in ("attentive_2shot_top1", "attentive_top1", "linear_top1",
                      "random_attentive_2shot_top1"):
            assert 0.0 <= row[probe] <= 1.0
    # nested data sizes beside one held-out split; all of dfn_subset is read, not copied
    half_uids = {sample_uid(s) for s in catalog.load("scaling.data.half.subset")}
    all_uids = {sample_uid(s) for s in catalog.load("dfn_subset")}
    assert half_uids < all_uids and len(all_uids) == 64
    half, full = (catalog.load(f"scaling.data.{d}.data_size") for d in ("half", "all"))
    assert half["val_images"] == full["val_images"] > 0
    assert 0 < half["train_images"] < full["train_images"]
    assert len(half_uids) == half["train_images"] + half["val_images"]
    assert full["train_images"] + full["val_images"] == 64
    assert set(results.filter(pl.col("data") == "half")["train_images"]) == {half["train_images"]}
    assert not (tmp_path / "data/05_model_input/scaling/all/subset").exists()
    # every point's artifacts are versioned files of its namespace
    for point in grid.points():
        folder = tmp_path / "data/06_models/scaling" / point.capacity / point.run / "aim_checkpoint"
        assert len(list(folder.iterdir())) == 1, folder
        metrics = json.loads(next((tmp_path / "data/08_reporting/scaling" / point.capacity /
                                   point.run / "probe_metrics.json").rglob("*.json")).read_text())
        assert {"pretrained", "random_init", "pretraining_gain"} <= set(metrics)
    curves = catalog.load("scaling_curves")
    assert set(curves["step"]) == {0, 4, 8} and curves.height == 4 * 3
    summary = catalog.load("scaling_summary")
    assert summary["budget"] == "equal_steps" and summary["grid"]["runs"] == 4
    assert set(summary["loss_vs_params"]) == {"half", "all"}
    assert summary["loss_vs_params"]["all"]["n"] == 2
    assert summary["spearman"]["attentive_2shot_top1"]["n"] == 4
    assert summary["findings"]["largest_data"] == "all"
    for name in ("scaling_loss_vs_params", "scaling_probes_vs_params", "scaling_loss_curves"):
        pngs = list((tmp_path / "data/08_reporting" / f"{name}.png").rglob("*.png"))
        assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG", name
