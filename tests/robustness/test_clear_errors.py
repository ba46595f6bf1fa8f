"""Bad configuration fails before any node runs, with a message naming the parameter and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from aim_kedro.curation.clip_models import ModelUnavailableError

CASES = {
    "unknown_preset": (
        "pretraining", {"pretraining": {"train": {"preset": "aim_13B"}}},
        ValueError, r"preset.*aim_13B.*aim_600M",
    ),
    "image_size_not_divisible": (
        "pretraining", {"pretraining": {"train": {"model_overrides": {"img_size": 30}}}},
        ValueError, r"pretraining\.train.*img_size \(30\) must be divisible by patch_size \(4\)",
    ),
    "checkpoint_path_is_a_catalog_entry": (
        "evaluation",
        {"evaluation": {"trunk": {"path": "/no/such/aim-600M.safetensors"}}},
        ValueError, r"evaluation\.trunk\.path is no longer a parameter: point the catalog entry "
                    r"`ml_aim_checkpoint` at the file in conf/local/catalog\.yml",
    ),
    "run_dir_is_a_catalog_entry": (
        "pretraining", {"pretraining": {"run_dir": "data/06_models/pretraining_run"}},
        ValueError, r"pretraining\.run_dir is no longer a parameter: .*`pretraining_run`",
    ),
    "keep_fraction_out_of_range": (
        "curation", {"curation": {"filters": {"keep_fraction": 1.5}}},
        ValueError, r"curation\.filters\.keep_fraction.*e\.g\. 0\.15",
    ),
    "hub_model_while_offline": (
        "curation",
        {"curation": {"scoring": {"model": "open_clip",
                                  "model_name": "hf-hub:apple/DFN2B-CLIP-ViT-L-14"}}},
        ModelUnavailableError, r"curation\.scoring\.model_name='hf-hub:apple/DFN2B-CLIP-ViT-L-14'"
                               r".*HF_HUB_OFFLINE.*local-dir:",
    ),
}


@pytest.fixture
def project(tmp_path: Path, make_project_copy) -> Path:
    root = make_project_copy(tmp_path / "project")
    bootstrap_project(root)
    return root


def _written(project: Path) -> list[Path]:
    return [p for p in (project / "data").rglob("*") if p.is_file()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_parameter_fails_before_work(project: Path, monkeypatch, case: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline, runtime_params, error, message = CASES[case]
    with KedroSession.create(project_path=project, runtime_params=runtime_params) as session:
        with pytest.raises(error, match=message):
            session.run(pipeline_names=[pipeline])
    assert _written(project) == []


def test_published_checkpoint_that_does_not_exist_is_named(project: Path) -> None:
    config = {"img_size": 224, "patch_size": 14, "embed_dim": 1536, "num_blocks": 24,
              "num_heads": 12, "probe_layers": 6, "num_classes": 1000}
    runtime = {"evaluation": {"trunk": {"config": config}}}
    with KedroSession.create(project_path=project, runtime_params=runtime) as session:
        with pytest.raises(FileNotFoundError, match=r"ml_aim_checkpoint.*conf/local/catalog\.yml"):
            session.run(pipeline_names=["evaluation_ml_aim"])
    assert _written(project) == []


def test_catalog_path_that_does_not_exist_is_named(project: Path) -> None:
    missing = project / "no_such_pool"
    (project / "conf/local/catalog.yml").write_text(yaml.safe_dump({"raw_pool": {
        "type": "aim_kedro.datasets.WebDatasetShards", "filepath": str(missing)}}))
    with KedroSession.create(project_path=project) as session:
        with pytest.raises(FileNotFoundError, match=r"raw_pool.*conf/local/catalog\.yml"):
            session.run(pipeline_names=["curation"], node_names=["build_pool_index"])
    assert _written(project) == []
