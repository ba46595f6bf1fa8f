"""Test-wide settings: offline hub, no telemetry, deterministic and light torch."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny tensors: one intra-op thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(int(os.environ.get("AIM_KEDRO_TEST_THREADS", "1")))


PROJECT = Path(__file__).resolve().parents[1]
DATA_LAYERS = ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input",
               "06_models", "07_model_output", "08_reporting")


def copy_project(root: Path) -> Path:
    """conf/ (without local), pyproject.toml, .telemetry and an empty data/ tree at ``root``:
    enough for a KedroSession, since the package itself is installed (editable) in the venv."""
    root.mkdir(parents=True)
    shutil.copytree(PROJECT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(PROJECT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(PROJECT / ".telemetry", root / ".telemetry")
    (root / "src").mkdir()
    (root / "logs").mkdir()
    for layer in DATA_LAYERS:
        (root / "data" / layer).mkdir(parents=True)
    return root


@pytest.fixture(scope="session")
def make_project_copy() -> Callable[[Path], Path]:
    """The one way tests build a temporary copy of the project."""
    return copy_project
