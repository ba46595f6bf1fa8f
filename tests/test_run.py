"""A KedroSession runs the project's pipelines on a temporary copy of the project."""

from pathlib import Path

import polars as pl
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

SMALL_SAMPLE = {
    "sample": {
        "counts": {"clean_digits": 30, "clean_photos": 20, "wrong_caption": 6, "exact_duplicate": 4,
                   "near_duplicate": 4, "face": 12, "corrupt": 4, "eval_leak": 3},
        "trusted": {"photos": 10},
    }
}


@pytest.fixture
def project_copy(tmp_path: Path, make_project_copy) -> Path:
    """A temporary copy of the project (see tests/conftest.py)."""
    return make_project_copy(tmp_path / "project")


def test_sample_pipeline_runs_in_a_session_and_versions_its_outputs(project_copy: Path) -> None:
    bootstrap_project(project_copy)
    for _ in range(2):
        with KedroSession.create(project_path=project_copy, runtime_params=SMALL_SAMPLE) as session:
            session.run(pipeline_names=["sample"])
    versions = sorted((project_copy / "data/01_raw/raw_pool").iterdir())
    assert len(versions) == 2
    truth_versions = sorted((project_copy / "data/01_raw/sample_truth.parquet").iterdir())
    truth = pl.read_parquet(truth_versions[-1] / "sample_truth.parquet")
    assert truth.height == 30 + 20 + 6 + 4 + 4 + 12 + 4 + 3
    for name in ("probe_train", "probe_test", "trusted_pairs"):
        assert len(list((project_copy / "data/01_raw" / name).iterdir())) == 2


def test_bad_parameter_fails_before_any_node_runs(project_copy: Path) -> None:
    bootstrap_project(project_copy)
    with KedroSession.create(project_path=project_copy, runtime_params={"sample": {"image_size": 30}}) as session:
        with pytest.raises(ValueError, match="sample.image_size"):
            session.run(pipeline_names=["sample"])
    assert not list((project_copy / "data/01_raw").iterdir())


def test_missing_input_is_named_before_work(project_copy: Path) -> None:
    bootstrap_project(project_copy)
    with KedroSession.create(project_path=project_copy) as session:
        with pytest.raises(FileNotFoundError, match="probe_test"):
            session.run(pipeline_names=["sample"], from_nodes=["build_raw_pool"])
