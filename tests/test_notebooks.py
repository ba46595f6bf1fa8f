"""The notebooks run top to bottom on the project's data, in a kernel of this venv's Python.

They read what `make run` (or `kedro run`) wrote under data/. Where that is missing (a fresh
clone, CI), the whole project is first run on a copy with a small sample, a tiny filtering
network, the `aim_tiny` trunk and short probes (about a minute on 2 cores), and the notebooks
read that copy. AIM_KEDRO_PROJECT points the notebooks and this test at another project.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from conftest import TINY_FILTER_NETWORK
from kedro.config import OmegaConfigLoader
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog

PROJECT = Path(__file__).resolve().parents[1]
NOTEBOOKS = PROJECT / "notebooks"
KERNEL_NAME = "aim-kedro-test-python"
CELL_TIMEOUT_S = 600
# Catalog entries each notebook loads, and how many figures it draws at least.
INPUTS = {
    "01_explore_dfn_subset.ipynb": (
        ("raw_pool", "sample_truth", "pool_manifest", "dfn_manifest", "curation_report",
         "dfn_subset"),
        4,
    ),
    "02_probe_a_trunk.ipynb": (
        ("aim_checkpoint", "probe_train", "probe_test", "probe_metrics", "loss_vs_accuracy",
         "loss_vs_accuracy_summary"),
        1,
    ),
}


# The whole project in about a minute: what the notebooks need, not the sample's targets.
SMALL_RUN = {
    "sample": {
        "counts": {"clean_digits": 40, "clean_photos": 20, "wrong_caption": 6,
                   "exact_duplicate": 4, "near_duplicate": 4, "face": 12, "corrupt": 4,
                   "eval_leak": 3},
        "trusted": {"photos": 10, "faces": 6},
    },
    "curation": {"progress": False, "filter_network": TINY_FILTER_NETWORK},
    "pretraining": {
        "val_percent": 20.0,
        "train": {"preset": "aim_tiny", "batch_size": 16, "warmup_steps": 2, "total_steps": 12,
                  "checkpoint_every": 6, "keep_every": 6, "val_every": 6, "val_batches": 1,
                  "num_workers": 0, "progress": False},
    },
    "evaluation": {
        "probes": {"lrs": {"attentive": [1.0e-2], "linear": [3.0e-3]}, "epochs": 1,
                   "min_steps": 20, "low_shot": {"shots": 10, "seeds": [0]}},
        "loss_vs_accuracy": {"max_checkpoints": 3},
    },
}


def _project() -> Path:
    return Path(os.environ.get("AIM_KEDRO_PROJECT", PROJECT)).resolve()


@pytest.fixture(scope="module")
def notebook_project(tmp_path_factory: pytest.TempPathFactory, make_project_copy) -> Path:
    """The project whose data the notebooks read: this one (or AIM_KEDRO_PROJECT) when it holds
    every input, else a copy on which the whole project has just run at small size."""
    project = _project()
    if all(not _missing(project, inputs) for inputs, _ in INPUTS.values()):
        return project
    copy = make_project_copy(tmp_path_factory.mktemp("notebooks") / "project")
    bootstrap_project(copy)
    cwd = Path.cwd()
    os.chdir(copy)  # relative catalog paths (pretraining_run, a run folder) are read from the cwd
    try:
        with KedroSession.create(project_path=copy, runtime_params=SMALL_RUN) as session:
            session.run()
    finally:
        os.chdir(cwd)
    return copy


def _missing(project: Path, names: tuple[str, ...]) -> list[str]:
    """Entries without a saved version, read with the project's base + local catalog."""
    conf = OmegaConfigLoader(conf_source=str(project / "conf"), base_env="base",
                             default_run_env="local")
    cwd = Path.cwd()
    os.chdir(project)  # catalog file paths are relative to the project root
    try:
        catalog = DataCatalog.from_config(conf["catalog"])
        return [name for name in names if name not in catalog or not catalog.exists(name)]
    finally:
        os.chdir(cwd)


def _kernel_manager(tmp_path: Path):
    """A kernel of this interpreter (not whatever `python3` spec is on the Jupyter path)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(path=str(kernels / KERNEL_NAME))
    return KernelManager(kernel_name=KERNEL_NAME,
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def test_committed_notebooks_carry_no_outputs() -> None:
    for name in INPUTS:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [cell for cell in book.cells if cell.cell_type == "code"]
        assert code, name
        assert all(not cell.outputs and cell.execution_count is None for cell in code), (
            f"{name} has outputs: clear them before committing"
        )
        assert code[0].source.strip() == "%load_ext kedro.ipython", name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_notebook_runs_top_to_bottom(name: str, tmp_path: Path, notebook_project: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    inputs, min_figures = INPUTS[name]
    assert _missing(notebook_project, inputs) == []
    monkeypatch.setenv("AIM_KEDRO_PROJECT", str(notebook_project))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    figures = sum(
        1 for cell in book.cells if cell.cell_type == "code"
        for output in cell.outputs if "image/png" in output.get("data", {})
    )
    assert figures >= min_figures, f"{name} drew {figures} figures, expected {min_figures}+"
