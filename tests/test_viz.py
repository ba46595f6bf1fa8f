"""kedro-viz's static build shows every pipeline's nodes, and renders them in a headless browser."""

from __future__ import annotations

import functools
import io
import json
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from PIL import Image

from aim_kedro.pipeline_registry import DEFAULT_ORDER

PROJECT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_SECONDS = 45
# Table entries whose real data has list/array columns (face boxes, embeddings, hashes).
NESTED_TABLES = ("sample_truth", "pool_index", "clip_embeddings", "face_boxes", "dfn_manifest")
NODE_TEXT = re.compile(r'<text class="pipeline-node__text"[^>]*>([^<]+)</text>')


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory, make_project_copy) -> Path:
    """A temporary copy of the project (see tests/conftest.py), shared by this module."""
    return make_project_copy(tmp_path_factory.mktemp("viz") / "project")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _save_preview_data(root: Path) -> dict[str, str]:
    """Tiny versions of the custom datasets' artifacts, so their previews have something to show."""
    conf = OmegaConfigLoader(conf_source=str(root / "conf"), base_env="base", default_run_env="local")
    catalog = DataCatalog.from_config(conf["catalog"])
    expected = {}
    samples = [{"__key__": f"{i:04d}", "png": _png(), "txt": f"a red square {i}",
                "json": {"uid": f"{i:032x}", "source": "test"}} for i in range(3)]
    catalog.save("raw_pool", samples)
    expected["raw_pool"] = "TablePreview"
    if "aim_checkpoint" in catalog:
        catalog.save("aim_checkpoint", {"config": {"preset": "aim_tiny", "embed_dim": 8},
                                        "state_dict": {"w": torch.zeros(2)},
                                        "metadata": {"step": 1}})
        expected["aim_checkpoint"] = "JSONPreview"
    return expected


@pytest.fixture(scope="module")
def viz_build(project_copy: Path) -> tuple[Path, dict[str, str]]:
    """`kedro viz build --include-previews`, in-process: the CLI runs these two calls in a child."""
    from kedro_viz.integrations.deployment.deployer_factory import DeployerFactory
    from kedro_viz.server import load_and_populate_data

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project_copy)  # kedro-viz builds into ./build and resolves data paths from cwd
        expected_previews = _save_preview_data(project_copy)
        load_and_populate_data(project_copy, include_hooks=False, package_name="aim_kedro")
        DeployerFactory.create_deployer("local").deploy(is_all_previews_enabled=True)
    return project_copy / "build", expected_previews


def _registered() -> dict:
    from kedro.framework.project import pipelines

    return dict(pipelines)


def _api(build: Path, path: str) -> dict:
    return json.loads((build / "api" / path).read_text())


def test_every_pipeline_is_registered(viz_build) -> None:
    missing = [name for name in DEFAULT_ORDER if name not in _registered()]
    assert not missing, f"pipelines not registered (yet?): {missing}"


def test_static_build_lists_every_pipeline_s_nodes_and_datasets(viz_build) -> None:
    build, _ = viz_build
    main = _api(build, "main")
    registered = _registered()
    assert {p["id"] for p in main["pipelines"]} == set(registered)
    for name, pipeline in registered.items():
        graph = _api(build, f"pipelines/{name}")
        tasks = {n["name"] for n in graph["nodes"] if n["type"] == "task"}
        data = {n["name"] for n in graph["nodes"] if n["type"] == "data"}
        assert tasks == {n.name for n in pipeline.nodes}, name
        assert data == {d for d in pipeline.datasets() if not d.startswith("params:")}, name
    for node in main["nodes"]:
        if node["type"] == "task":
            assert node["tags"], f"node {node['name']} has no tag: the tag filter cannot group it"


def test_custom_datasets_previews_have_a_type_the_frontend_renders(viz_build) -> None:
    build, expected = viz_build
    ids = {n["name"]: n["id"] for n in _api(build, "main")["nodes"] if n["type"] == "data"}
    for name, preview_type in expected.items():
        node = _api(build, f"nodes/{ids[name]}")
        assert node["preview_type"] == preview_type, name
        assert node["preview"], name
    raw_pool = _api(build, f"nodes/{ids['raw_pool']}")["preview"]
    assert raw_pool["columns"][:3] == ["key", "shard", "uid"]
    assert [row[0] for row in raw_pool["data"]] == ["0000", "0001", "0002"]


def test_table_previews_of_list_columns_serialise_or_are_switched_off(tmp_path: Path) -> None:
    """kedro-viz serialises previews with pydantic: one numpy array aborts `kedro viz build`."""
    import polars as pl
    from pydantic_core import PydanticSerializationError, to_json

    conf = OmegaConfigLoader(conf_source=str(PROJECT / "conf"), base_env="base",
                             default_run_env="local")["catalog"]
    broken = []
    for name in NESTED_TABLES:
        if name not in conf:
            continue
        entry = {**conf[name], "filepath": str(tmp_path / name / Path(conf[name]["filepath"]).name)}
        dataset = DataCatalog.from_config({name: entry})[name]
        if (getattr(dataset, "metadata", None) or {}).get("kedro-viz", {}).get("preview") is False:
            continue
        dataset.save(pl.DataFrame({"uid": ["a" * 32], "face_boxes": [[[1, 2, 30, 40]]]}))
        try:
            to_json(dataset.preview())
        except PydanticSerializationError as exc:
            broken.append(f"{name} ({exc})")
    assert not broken, (
        "these previews abort `kedro viz build --include-previews`: " + ", ".join(broken)
        + ". Give the entries `metadata: {kedro-viz: {preview: false}}`, or a preview() that "
        "returns plain Python rows (polars iter_rows) instead of pandas' numpy cells."
    )


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the browser check needs it")
def test_the_built_site_renders_every_node_in_headless_chromium(viz_build, tmp_path: Path) -> None:
    build, _ = viz_build
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
