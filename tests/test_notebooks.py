"""The notebooks run top to bottom on the project's data, in a kernel of this venv's Python.

They read what `make run` (or `kedro run`) wrote under data/; producing that here would take
minutes of curation and pre-training, so a notebook whose inputs are missing is skipped, naming
them. AIM_KEDRO_PROJECT points the notebooks and this test at another copy of the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from kedro.config import OmegaConfigLoader
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


def _project() -> Path:
    return Path(os.environ.get("AIM_KEDRO_PROJECT", PROJECT)).resolve()


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
def test_notebook_runs_top_to_bottom(name: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    project = _project()
    inputs, min_figures = INPUTS[name]
    missing = _missing(project, inputs)
    if missing:
        pytest.skip(f"{name}: no saved version of {', '.join(missing)} under {project}/data; "
                    "run `make run` (or `kedro run`) first")
    monkeypatch.setenv("AIM_KEDRO_PROJECT", str(project))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    figures = sum(
        1 for cell in book.cells if cell.cell_type == "code"
        for output in cell.outputs if "image/png" in output.get("data", {})
    )
    assert figures >= min_figures, f"{name} drew {figures} figures, expected {min_figures}+"
