"""`kedro viz build --include-previews` writes the whole site with every pipeline's nodes and the
datasets' previews, and a headless browser renders it."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import kedro_cli
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline

from aim_kedro.pipeline_registry import DEFAULT_ORDER

PROJECT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_SECONDS = 45
NODE_TEXT = re.compile(r'<text class="pipeline-node__text"[^>]*>([^<]+)</text>')

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def viz_build(cli_project) -> Path:
    """`kedro viz build --include-previews`, as a user types it, on the project copy where every
    pipeline has run (so every dataset has a version to preview)."""
    project = cli_project["path"]
    shutil.rmtree(project / "build", ignore_errors=True)
    result = kedro_cli(project, "viz", "build", "--include-previews")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Failed" not in result.stdout and "Error" not in result.stdout, result.stdout[-4000:]
    return project / "build"


def _registered() -> dict:
    from kedro.framework.project import pipelines

    return dict(pipelines)


def _api(build: Path, path: str) -> dict:
    return json.loads((build / "api" / path).read_text())


def test_every_pipeline_is_registered(viz_build) -> None:
    missing = [name for name in DEFAULT_ORDER if name not in _registered()]
    assert not missing, f"pipelines not registered (yet?): {missing}"


def test_the_build_is_the_whole_site(viz_build) -> None:
    assert (viz_build / "index.html").is_file()
    assert any(viz_build.glob("static/js/*.js")) or any(viz_build.rglob("*.js"))
    assert (viz_build / "api" / "main").is_file()


def test_static_build_lists_every_pipeline_s_nodes_and_datasets(viz_build, cli_project) -> None:
    main = _api(viz_build, "main")
    registered = dict(cli_project["pipelines"])
    registered["__default__"] = sum((registered[name] for name in DEFAULT_ORDER), Pipeline([]))
    assert {p["id"] for p in main["pipelines"]} == set(registered)
    for name, pipeline in registered.items():
        graph = _api(viz_build, f"pipelines/{name}")
        tasks = Counter(n["name"] for n in graph["nodes"] if n["type"] == "task")
        data = {n["name"] for n in graph["nodes"] if n["type"] == "data"}
        # kedro-viz names a namespaced node by its own name; its namespace is the group it is in
        assert tasks == Counter(n.name.rsplit(".", 1)[-1] for n in pipeline.nodes), name
        assert data == {d for d in pipeline.datasets() if not d.startswith("params:")}, name
    for node in main["nodes"]:
        if node["type"] == "task":
            assert node["tags"], f"node {node['name']} has no tag: the tag filter cannot group it"


def test_every_dataset_with_a_preview_and_data_shows_it(viz_build, cli_project) -> None:
    """Every custom dataset's preview, on the run's real data (binary hash columns included)."""
    cwd = Path.cwd()
    os.chdir(cli_project["path"])
    try:
        conf = OmegaConfigLoader(conf_source="conf", base_env="base", default_run_env="local")
        catalog = DataCatalog.from_config(conf["catalog"])
        nodes = {n["name"]: n["id"] for n in _api(viz_build, "main")["nodes"] if n["type"] == "data"}
        missing = []
        for name, node_id in sorted(nodes.items()):
            dataset = catalog.get(name) if name in catalog else None
            if dataset is None or not hasattr(dataset, "preview") or not dataset.exists():
                continue
            if not _api(viz_build, f"nodes/{node_id}").get("preview"):
                missing.append(name)
    finally:
        os.chdir(cwd)
    assert "pool_index" in nodes
    assert not missing, f"no preview in the build for {missing}"
    pool_index = _api(viz_build, f"nodes/{nodes['pool_index']}")["preview"]
    assert any(isinstance(cell, str) and cell.startswith("0x") for row in pool_index["data"]
               for cell in row), "pool_index's binary hash columns are not shown as hex"


def test_table_previews_of_list_and_binary_columns_serialise(tmp_path: Path) -> None:
    """kedro-viz serialises previews with pydantic: one numpy array or one byte string that is
    not UTF-8 aborts `kedro viz build --include-previews`."""
    import polars as pl
    from pydantic_core import PydanticSerializationError, to_json

    conf = OmegaConfigLoader(conf_source=str(PROJECT / "conf"), base_env="base",
                             default_run_env="local")["catalog"]
    tables = [name for name, entry in conf.items() if isinstance(entry, dict)
              and str(entry.get("type", "")).endswith("EagerPolarsDataset")]
    assert tables
    broken = []
    for name in tables:
        entry = {**conf[name], "filepath": str(tmp_path / name / Path(conf[name]["filepath"]).name)}
        dataset = DataCatalog.from_config({name: entry})[name]
        dataset.save(pl.DataFrame({"uid": ["a" * 32], "face_boxes": [[[1, 2, 30, 40]]],
                                   "sha256": [bytes(range(0xA0, 0xC0))]}))
        try:
            to_json(dataset.preview())
        except PydanticSerializationError as exc:
            broken.append(f"{name} ({exc})")
    assert not broken, "these previews abort `kedro viz build --include-previews`: " + ", ".join(broken)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the browser check needs it")
def test_the_built_site_renders_every_node_in_headless_chromium(viz_build, tmp_path: Path) -> None:
    build = viz_build
    handler = functools.partial(_QuietHandler, directory=str(build))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    deadline = threading.Timer(BROWSER_SECONDS + 15, server.shutdown)  # never outlives the test
    thread.start()
    deadline.start()
    try:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-quic", "--disable-extensions", f"--user-data-dir={tmp_path / 'chromium'}",
             # only this machine resolves: the page's web fonts and analytics are not fetched
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
             "--window-size=1600,1000", "--virtual-time-budget=15000", "--dump-dom",
             f"http://127.0.0.1:{server.server_address[1]}/"],
            capture_output=True, text=True, timeout=BROWSER_SECONDS, check=True,
        ).stdout
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    rendered = set(NODE_TEXT.findall(dom))
    main = _api(build, "main")
    shown = {n["name"] for n in main["nodes"] if n["type"] in ("task", "data")}
    assert shown, "api/main lists no nodes"
    assert shown <= rendered, f"not drawn in the graph: {sorted(shown - rendered)}"
