"""The notebooks run top to bottom on the project's data, in a kernel of this venv's Python, and
``kedro jupyter lab`` (how their first cell says to open them) serves JupyterLab.

They read the versions of one run (the newest completed ``run_manifest`` that covers what they
show). Where this project has no such run (a fresh clone, CI), they read ``cli_project``: the
whole project run through the CLI on a small copy (tests/conftest.py). AIM_KEDRO_PROJECT
points the notebooks and this test at another project.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog

from aim_kedro.lineage import RunVersions

PROJECT = Path(__file__).resolve().parents[1]
NOTEBOOKS = PROJECT / "notebooks"
KERNEL_NAME = "aim-kedro-test-python"
CELL_TIMEOUT_S = 600
JUPYTER_START_S = 240
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


@pytest.fixture(scope="module")
def notebook_project(request: pytest.FixtureRequest) -> Path:
    """The project whose data the notebooks read: this one (or AIM_KEDRO_PROJECT) when one of
    its runs covers every input, else ``cli_project``."""
    project = _project()
    if all(_run_of(project, inputs) is not None for inputs, _ in INPUTS.values()):
        return project
    return request.getfixturevalue("cli_project")["path"]


def _run_of(project: Path, names: tuple[str, ...]) -> RunVersions | None:
    """The run the notebooks would read there (None when no completed run covers ``names``)."""
    conf = OmegaConfigLoader(conf_source=str(project / "conf"), base_env="base",
                             default_run_env="local")
    cwd = Path.cwd()
    os.chdir(project)  # catalog file paths are relative to the project root
    try:
        catalog = DataCatalog.from_config(conf["catalog"])
        return RunVersions.find(catalog, needs=names)
    except ValueError:
        return None
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
    run = _run_of(notebook_project, inputs)
    assert run is not None
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
    text = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert f"RunVersions({run.version}:" in text, f"{name} did not read run {run.version}"


def test_notebooks_say_how_to_open_them() -> None:
    for name in INPUTS:
        intro = nbformat.read(NOTEBOOKS / name, as_version=4).cells[0]
        assert intro.cell_type == "markdown" and "kedro jupyter lab" in intro.source, name
        assert "AIM_KEDRO_RUN" in intro.source, name


@pytest.mark.slow
def _get_when_listening(url: str, deadline: float) -> str:
    """The body at ``url``, retried while the server that printed it is not yet accepting."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.read().decode()
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_kedro_jupyter_lab_serves_jupyterlab(tmp_path: Path) -> None:
    """The documented `kedro jupyter lab` starts JupyterLab with the project's kernel."""
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "HOME": str(tmp_path)}
    kedro = str(Path(sys.executable).parent / "kedro")
    with socket.socket() as probe:  # a free port: with --port=0 some servers print port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = ["--allow-root"] if os.geteuid() == 0 else []  # CI runs as root; Jupyter refuses it
    proc = subprocess.Popen(
        [kedro, "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", *root],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    seen, url = [], None
    deadline = time.monotonic() + JUPYTER_START_S
    try:
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            if match := re.search(r"(http://127\.0\.0\.1:\d+)/lab", line):
                url = match.group(1)
        assert url, "JupyterLab did not start:\n" + "".join(seen[-40:])
        specs = _get_when_listening(f"{url}/api/kernelspecs", deadline)
        assert "kedro_aim_kedro" in specs, specs[:2000]
        with urllib.request.urlopen(f"{url}/lab", timeout=30) as response:
            assert response.status == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
