"""The evaluation pipeline: parameter checks, its shape, its catalog, and one short end-to-end run."""

import copy
import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure
from PIL import Image
from sklearn.datasets import load_digits

from aim_kedro.aim.configs import EvaluationConfig, FeaturesConfig, ProbesConfig
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import get_config
from aim_kedro.aim.probe_views import TrunkViews
from aim_kedro.datasets import ImageFolderDataset
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.pipelines.evaluation import create_pipeline
from aim_kedro.pipelines.evaluation.nodes import (
    extract_probe_features,
    extract_random_init_features,
    load_eval_sets,
    load_trunk,
    train_probes,
    validate_evaluation_params,
    validate_ml_aim_evaluation_params,
)

PROJECT = Path(__file__).resolve().parents[3]
PARAMS = yaml.safe_load((PROJECT / "conf/base/parameters_evaluation.yml").read_text())["evaluation"]

FAST_PROBES = {
    "kinds": ["attentive", "linear"],
    "lrs": {"attentive": [3e-3], "linear": [1e-2]},
    "val_fraction": 0.2,
    "epochs": 2,
    "min_steps": 10,
    "batch_size": 32,
    "low_shot": {"shots": 2, "seeds": [0, 1]},
}


class KeptDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so the test can read outputs consumed downstream."""

    def _release(self) -> None:
        pass


def params(**overrides) -> dict:
    out = copy.deepcopy(PARAMS)
    for key, value in overrides.items():
        out[key] = (
            {**out[key], **value}
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def test_shipped_parameters_validate_and_fill_the_device():
    settings = validate_evaluation_params(PARAMS)
    assert settings["device"] in ("cpu", "cuda")
    assert "trunk" not in settings, "the default pipeline probes the catalog's aim_checkpoint"
    assert isinstance(settings["features"], FeaturesConfig)
    assert isinstance(settings["probes"], ProbesConfig)


def test_dataclass_defaults_are_the_shipped_parameters():
    """One source of truth: each YAML block is its dataclass's defaults (device resolved)."""
    shipped = EvaluationConfig.from_params(PARAMS)
    defaults = EvaluationConfig()
    assert defaults.device == "auto" and PARAMS["device"] == "auto"
    shipped.device = "auto"
    assert shipped == defaults
    assert EvaluationConfig.from_params({}) == EvaluationConfig.from_params(PARAMS)
    protocol = defaults.probes.protocol("cpu")
    assert protocol.shot_seeds == (0, 1, 2) and protocol.training.epochs == PARAMS["probes"]["epochs"]
    assert protocol.training.min_steps == PARAMS["probes"]["min_steps"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            {"trunk": {"source": "ml_aim", "path": "/no/such/aim.safetensors", "config": {}}},
            "trunk.path",
        ),
        ({"trunk": {"source": "ml_aim"}}, "trunk.source"),
        (
            {
                "dataset": {
                    "kind": "image_folder",
                    "train_path": "/no/such/train",
                    "test_path": "/tmp",
                }
            },
            "dataset.train_path",
        ),
        ({"dataset": {"kind": "csv"}}, "dataset.kind"),
        ({"features": {"layers": "middle"}}, "features.layers"),
        ({"features": {"dtype": "int8"}}, "features.dtype"),
        ({"probes": {"lrs": {"attentive": [], "linear": [1e-3]}}}, "probes.lrs.attentive"),
        ({"probes": {"val_fraction": 1.5}}, "probes.val_fraction"),
        ({"probes": {"low_shot": {"shot": 5}}}, "evaluation.probes.low_shot parameter"),
        ({"loss_vs_accuracy": {"kind": "knn"}}, "loss_vs_accuracy"),
        ({"recipe": "augmented"}, "evaluation.recipe"),
        ({"aim_paper": {"scale": [0.5, 0.1]}}, "aim_paper.scale"),
        ({"aim_paper": {"epochs": 0}}, "aim_paper.epochs"),
        ({"aim_paper": {"flip": "yes"}}, "aim_paper.flip"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_parameters_are_named(overrides, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        validate_evaluation_params(params(**overrides))


def test_ml_aim_config_must_be_complete():
    with pytest.raises(ValueError, match="trunk.config"):
        validate_evaluation_params(params(trunk={"config": {"img_size": 224}}))
    with pytest.raises(ValueError, match=r"evaluation\.trunk\.config is null.*evaluation_ml_aim"):
        validate_ml_aim_evaluation_params(PARAMS)
    config = {"img_size": 224, "patch_size": 14, "embed_dim": 1536, "num_blocks": 24,
              "num_heads": 12, "probe_layers": [14, 15, 16, 17, 18, 19], "num_classes": 1000}
    settings = validate_ml_aim_evaluation_params(params(trunk={"config": config}))
    assert settings["trunk"].kwargs() == config and "loss_vs_accuracy" not in settings


def test_probe_sets_from_image_folder_entries_share_the_training_index(tmp_path):
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("cat",))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "a.png").write_bytes(_digit_png(np.eye(8) * 16, 8))
    train = ImageFolderDataset(filepath=str(tmp_path / "train")).load()
    test = ImageFolderDataset(filepath=str(tmp_path / "val")).load()
    sets = load_eval_sets(train, test, EvaluationConfig().dataset)
    assert sets["train"].classes == sets["test"].classes == ["ant", "bee", "cat"]
    assert [label for _, _, label in sets["test"]] == [2]


def test_pipeline_nodes_and_the_published_checkpoint_variant():
    full = create_pipeline()
    assert {n.name for n in full.nodes} == {
        "validate_evaluation_params",
        "load_eval_sets",
        "load_trunk",
        "extract_probe_features",
        "extract_random_init_features",
        "train_probes",
        "plot_probe_results",
        "compute_loss_vs_accuracy",
        "plot_loss_vs_accuracy",
    }
    assert full.inputs() == {
        "params:evaluation",
        "probe_train",
        "probe_test",
        "aim_checkpoint",
        "aim_intermediate_checkpoints",
        "training_history",
    }
    assert all("evaluation" in n.tags for n in full.nodes)
    published = create_pipeline(trunk_source="ml_aim")
    assert published.inputs() == {"params:evaluation", "probe_train", "probe_test",
                                  "ml_aim_checkpoint"}
    assert "probe_metrics" in published.all_outputs()
    assert {n.name for n in published.nodes} == {n.name for n in full.nodes} - {
        "compute_loss_vs_accuracy", "plot_loss_vs_accuracy"}
    # each node takes only the typed blocks it uses, and every block handed on is used
    by_name = {n.name: set(n.inputs) for n in full.nodes}
    assert by_name["train_probes"] == {"probe_features", "random_init_features",
                                       "eval_probes_config", "eval_device", "eval_recipe_config",
                                       "eval_aim_paper_config", "eval_trunk", "eval_sets",
                                       "eval_random_init_config"}
    assert by_name["load_trunk"] == {"aim_checkpoint"}
    for pipe in (full, published):
        handed_on = {o for n in pipe.nodes if n.name == "validate_evaluation_params"
                     for o in n.outputs}
        assert handed_on <= {i for n in pipe.nodes for i in n.inputs}


def test_catalog_entries_are_versioned_and_cover_the_outputs():
    entries = yaml.safe_load((PROJECT / "conf/base/catalog_evaluation.yml").read_text())
    assert entries["ml_aim_checkpoint"]["type"] == "aim_kedro.datasets.StateDictDataset"
    outputs = create_pipeline().all_outputs()
    for name in (
        "probe_features",
        "random_init_features",
        "probe_metrics",
        "probe_results_plot",
        "loss_vs_accuracy",
        "loss_vs_accuracy_summary",
        "loss_vs_accuracy_plot",
    ):
        assert name in outputs and entries[name]["versioned"] is True
    catalog = DataCatalog.from_config(entries)
    assert "probe_metrics" in catalog


def _digit_png(image: np.ndarray, size: int) -> bytes:
    grey = (image / 16.0 * 255).astype(np.uint8)
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).resize((size, size), Image.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


def _probe_shards(
    root: Path, per_class_train: int, per_class_test: int, size: int
) -> tuple[ShardSet, ShardSet]:
    digits = load_digits()
    splits = {"train": [], "test": []}
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        seen = counts.get(int(label), 0)
        if seen >= per_class_train + per_class_test:
            continue
        counts[int(label)] = seen + 1
        split = "train" if seen < per_class_train else "test"
        splits[split].append(
            {
                "__key__": f"{index:05d}",
                "png": _digit_png(image, size),
                "cls": str(int(label)),
                "json": {"eval_id": f"d{index}", "label": int(label)},
            }
        )
    out = []
    for split, samples in splits.items():
        write_shards(samples, str(root / split), samples_per_shard=64)
        out.append(ShardSet.open(str(root / split)))
    return out[0], out[1]


@pytest.mark.slow
def test_evaluation_pipeline_end_to_end_on_a_tiny_run(tmp_path):
    cfg = get_config("aim_tiny")
    probe_train, probe_test = _probe_shards(
        tmp_path, per_class_train=12, per_class_test=5, size=cfg.img_size
    )
    torch.manual_seed(0)
    series = {}
    for step in (10, 20, 30):
        series[step] = {k: v.clone() for k, v in AIM(cfg).state_dict().items()}
    config = {**cfg.to_dict(), "preset": "aim_tiny"}
    history = pl.DataFrame(
        {
            "step": [5, 10, 20, 25, 30],
            "train_loss": [1.0, 0.9, 0.8, 0.75, 0.7],
            "val_loss": [None, 0.95, 0.85, None, 0.8],
            "lr": [1e-3] * 5,
            "grad_norm": [1.0] * 5,
            "images_per_s": [100.0] * 5,
        }
    )
    run_params = params(
        device="cpu",
        features={"layers": "last6", "batch_size": 64},
        probes=FAST_PROBES,
        loss_vs_accuracy={"kind": "attentive", "lr": 3e-3, "shots": 2, "max_checkpoints": 8},
    )
    datasets = {
        "params:evaluation": MemoryDataset(run_params),
        "probe_train": MemoryDataset(probe_train, copy_mode="assign"),
        "probe_test": MemoryDataset(probe_test, copy_mode="assign"),
        "aim_checkpoint": MemoryDataset(
            {"config": config, "state_dict": series[30], "metadata": {"step": 30}},
            copy_mode="assign",
        ),
        "aim_intermediate_checkpoints": MemoryDataset(
            {"config": config, "steps": sorted(series), "load": series.__getitem__},
            copy_mode="assign",
        ),
        "training_history": MemoryDataset(history),
        "eval_trunk": MemoryDataset(copy_mode="assign"),
        "eval_sets": MemoryDataset(copy_mode="assign"),
    }
    for name in (
        "probe_features",
        "random_init_features",
        "probe_metrics",
        "probe_results_plot",
        "loss_vs_accuracy",
        "loss_vs_accuracy_summary",
        "loss_vs_accuracy_plot",
    ):
        datasets[name] = KeptDataset(copy_mode="assign")
    catalog = DataCatalog(datasets=datasets)
    SequentialRunner().run(create_pipeline(), catalog)

    metrics = catalog["probe_metrics"].load()
    for trunk in ("pretrained", "random_init"):
        assert set(metrics[trunk]) >= {"attentive", "linear", "attentive_2shot", "linear_2shot"}
        for name in ("attentive", "linear", "attentive_2shot", "linear_2shot"):
            entry = metrics[trunk][name]
            assert 0.0 <= entry["top1"] <= entry["top5"] <= 1.0
            assert entry["layers"] == [0, 1]
        assert "std" in metrics[trunk]["attentive_2shot"]
    assert metrics["random_init"]["trunk"] == "random_init(seed=0)"
    features = catalog["probe_features"].load()
    assert features["train"]["tokens"].shape == (120, cfg.num_patches, cfg.embed_dim)
    assert features["train"]["tokens"].dtype == torch.float16
    assert features["test"]["labels"].shape == (50,)

    table = catalog["loss_vs_accuracy"].load()
    assert table.columns == ["step", "val_loss", "top1"]
    assert table["step"].to_list() == [10, 20, 30]
    assert table["val_loss"].to_list() == [0.95, 0.85, 0.8]
    summary = catalog["loss_vs_accuracy_summary"].load()
    assert (
        summary["n"] == 3 and summary["spearman"] is not None and -1.0 <= summary["spearman"] <= 1.0
    )
    assert isinstance(catalog["probe_results_plot"].load(), Figure)
    assert isinstance(catalog["loss_vs_accuracy_plot"].load(), Figure)


def test_paper_recipe_probes_on_views_through_both_trunks_and_reports_the_same_metrics(
    tmp_path, monkeypatch
):
    drawn_by = []
    draw = TrunkViews.views

    def counted(self, generator):
        drawn_by.append(self.frozen.source)
        return draw(self, generator)

    monkeypatch.setattr(TrunkViews, "views", counted)
    cfg = get_config("aim_tiny")
    probe_train, probe_test = _probe_shards(tmp_path, per_class_train=4, per_class_test=2,
                                            size=24)
    torch.manual_seed(0)
    checkpoint = {"config": {**cfg.to_dict(), "preset": "aim_tiny"},
                  "state_dict": AIM(cfg).state_dict(), "metadata": {"step": 1}}
    fast = {**FAST_PROBES, "kinds": ["attentive"], "min_steps": 2, "low_shot": {"shots": 1, "seeds": [0]}}
    metrics = {}
    for recipe in ("cached", "aim_paper"):
        blocks = validate_evaluation_params(params(
            device="cpu", recipe=recipe, probes=fast, aim_paper={"epochs": 1},
            features={"batch_size": 64}))
        assert blocks["features"].crop_pct == (0.875 if recipe == "aim_paper" else 1.0)
        sets = load_eval_sets(probe_train, probe_test, blocks["dataset"])
        trunk = load_trunk(checkpoint)
        features = extract_probe_features(trunk, sets, blocks["features"], "cpu")
        random_features = extract_random_init_features(trunk, sets, blocks["features"],
                                                       blocks["random_init"], "cpu")
        metrics[recipe] = train_probes(features, random_features, blocks["probes"], "cpu",
                                       blocks["recipe"], blocks["aim_paper"], trunk, sets,
                                       blocks["random_init"])
        if recipe == "cached":
            assert drawn_by == []
    assert {source.split("(")[0] for source in drawn_by} == {"aim_checkpoint", "random_init"}
    for trunk_name in ("pretrained", "random_init"):
        cached, paper = metrics["cached"][trunk_name], metrics["aim_paper"][trunk_name]
        assert set(paper) == set(cached) and paper["recipe"] == "aim_paper"
        for probe in ("attentive", "attentive_1shot"):
            assert set(paper[probe]) == set(cached[probe])
            assert 0.0 <= paper[probe]["top1"] <= paper[probe]["top5"] <= 1.0
    assert set(metrics["aim_paper"]["pretraining_gain"]) == set(metrics["cached"]["pretraining_gain"])
