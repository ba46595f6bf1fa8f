"""The Kedro user's path through the CLI, as a user types it: every registered pipeline runs by
name, bad parameters and missing inputs fail before any node with their own message, runs say
what they read and wrote, and they stay quiet.

``cli_project`` (tests/conftest.py) has run every registered pipeline once with
``kedro run --pipelines NAME`` on a small copy of the project.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, REFERENCE, kedro_cli, kedro_cli_all

from aim_kedro.lineage import registered_pipelines

pytestmark = pytest.mark.slow

VERSION = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z")


def _versions(folder: Path) -> list[str]:
    """Saved versions of an entry folder, newest first."""
    return sorted((p.name for p in folder.iterdir() if VERSION.fullmatch(p.name)), reverse=True)


def _manifests(project: Path) -> list[dict]:
    folder = project / "data/08_reporting/run_manifest.json"
    return [json.loads((folder / v / "run_manifest.json").read_text())
            for v in _versions(folder) if (folder / v / "run_manifest.json").exists()]


def _manifest_of(project: Path, pipeline: str) -> dict:
    return next(m for m in _manifests(project)
                if m["run_params"].get("pipeline_names") == [pipeline] and m["status"] == "completed")


def _files(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in (project / "data").rglob("*") if p.is_file()}


def _refused(result, *needles: str) -> str:
    """The output of a run that must stop before any node, with its message alone."""
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert "Running node" not in out and "Traceback" not in out, out[-3000:]
    assert "(run again with --verbose for the traceback)" in out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-3000:]}"
    return out


def test_every_registered_pipeline_runs_from_the_cli_by_name(cli_project) -> None:
    project, runs, built = cli_project["path"], cli_project["runs"], cli_project["pipelines"]
    assert set(runs) == set(built) == set(registered_pipelines())
    for name, result in runs.items():
        assert result.returncode == 0, f"kedro run --pipelines {name}:\n{result.stdout[-4000:]}"
        manifest = _manifest_of(project, name)
        assert manifest["command"] == f"kedro run --pipelines {name}"
        assert manifest["outputs"], name
        assert set(manifest["nodes"]) == {n.name for n in built[name].nodes}


def test_published_aim_v1_weights_are_probed_from_a_local_file(cli_project) -> None:
    project = cli_project["path"]
    manifest = _manifest_of(project, "evaluation_ml_aim")
    checkpoint = manifest["inputs"]["ml_aim_checkpoint"]
    assert Path(checkpoint["filepath"]).resolve() == (REFERENCE / "tiny_aim_v1.safetensors").resolve()
    version = manifest["outputs"]["probe_metrics"]["version"]
    metrics = json.loads((project / "data/08_reporting/probe_metrics.json" / version /
                          "probe_metrics.json").read_text())
    assert 0.0 <= metrics["pretrained"]["attentive"]["top1"] <= 1.0


def test_runs_are_quiet_and_end_with_what_they_wrote(cli_project) -> None:
    for name, result in cli_project["runs"].items():
        out = result.stdout
        for noise in ("\x1b[", "deprecat", "Workflow tracking", "UserWarning", "Traceback"):
            assert noise.lower() not in out.lower(), f"{name}: {noise!r} in the output"
        manifest = _manifest_of(cli_project["path"], name)
        summary = f"run {manifest['version']}: {len(manifest['nodes'])} node(s) ran, "
        assert summary in out, f"{name}: no summary line {summary!r}"
        where = f"data/08_reporting/run_manifest.json/{manifest['version']}/run_manifest.json"
        assert f"run {manifest['version']} manifest: {where}" in out
        assert out.count("\r") < 40, f"{name}: {out.count(chr(13))} progress updates in a log"


def test_unknown_top_level_parameter_fails_before_any_node(cli_project) -> None:
    project = cli_project["path"]
    before = _files(project)
    result = kedro_cli(project, "run", "--pipelines", "curation", "--params",
                       "curaton.filters.keep_fraction=0.15")
    _refused(result, "Error (ValueError): unknown top-level parameter(s) ['curaton']",
             "'curaton' -> 'curation'")
    assert _files(project) == before


def test_unknown_nested_parameter_fails_and_verbose_shows_the_traceback(cli_project) -> None:
    project = cli_project["path"]
    before = _files(project)
    result = kedro_cli(project, "run", "--pipelines", "sample", "--params",
                       "sample.counts.faces=3", "--verbose")
    assert result.returncode == 1
    assert "Traceback" in result.stdout and "'faces' -> 'face'" in result.stdout
    assert "Running node" not in result.stdout
    assert _files(project) == before


def test_missing_version_names_it_and_lists_the_versions_that_exist(cli_project) -> None:
    project = cli_project["path"]
    asked = "2026-11-25T11.40.30.811Z"
    result = kedro_cli(project, "run", "--pipelines", "curation", "--load-versions",
                       f"raw_pool:{asked}")
    there = ", ".join(_versions(project / "data/01_raw/raw_pool"))
    out = _refused(result, f"`raw_pool`: version {asked} (asked for with --load-versions) does not "
                           "exist under data/01_raw/raw_pool", f"newest first: {there}.")
    assert "--pipeline sample" not in out


def test_missing_path_is_named_with_the_file_that_sets_it(cli_project) -> None:
    project = cli_project["path"]
    env = project / "conf" / "elsewhere"
    env.mkdir(exist_ok=True)
    (env / "catalog.yml").write_text(yaml.safe_dump({"raw_pool": {
        "type": "aim_kedro.datasets.WebDatasetShards", "filepath": "/no/such/pool",
        "versioned": False}}))
    result = kedro_cli(project, "run", "-e", "elsewhere", "--pipelines", "curation",
                       "--nodes", "build_pool_index")
    _refused(result, "`raw_pool`: /no/such/pool (set in conf/elsewhere/catalog.yml) does not exist",
             "node build_raw_pool of pipeline sample: `kedro run --pipelines sample`")


def test_in_memory_input_of_a_nodes_run_names_the_node_to_add(cli_project) -> None:
    result = kedro_cli(cli_project["path"], "run", "--pipelines", "evaluation", "--nodes",
                       "train_probes")
    _refused(result, "handed over in memory within one run",
             "node validate_evaluation_params of pipelines evaluation",
             "`--nodes validate_evaluation_params,train_probes`")


def test_pinning_one_input_loads_the_entries_written_with_it_from_the_same_run(cli_project) -> None:
    project = cli_project["path"]
    sample = _manifest_of(project, "sample")
    old = sample["version"]
    newer = "2099" + old[4:]
    for info in sample["outputs"].values():  # a newer sample run: a copy under a later version
        folder = project / info["filepath"]
        shutil.copytree(folder / old, folder / newer)
    try:
        # the nodes that read raw_pool, its siblings and probe_test; the rest of curation is
        # read from the fixture's run
        nodes = "build_pool_index,train_filter_network,deduplicate,report_curation"
        result = kedro_cli(project, "run", "--pipelines", "curation", "--nodes", nodes,
                           "--load-versions", f"raw_pool:{old}")
        assert result.returncode == 0, result.stdout[-3000:]
        assert f"loading sample_truth, trusted_pairs at version {old}, like raw_pool" in result.stdout
        manifest = _manifests(project)[0]
        assert manifest["command"].endswith(f"--load-versions raw_pool:{old}")
        read = {name: info["version"] for name, info in manifest["inputs"].items()}
        assert read["raw_pool"] == read["sample_truth"] == read["trusted_pairs"] == old
        assert read["probe_test"] == newer  # another node's output: the newest, as asked
    finally:
        for info in sample["outputs"].values():
            shutil.rmtree(project / info["filepath"] / newer, ignore_errors=True)


def test_the_catalog_of_the_versions_command_imports_no_pipeline_and_no_mlflow() -> None:
    """``aim-kedro versions`` only reads the entries' folders: building its catalog imports
    neither the pipelines (torch's model code, timm) nor mlflow (kedro-mlflow's hook)."""
    script = ("import sys, json; from aim_kedro.cli import _catalog; catalog = _catalog(None); "
              "print(json.dumps({'entries': 'pool_manifest' in catalog, 'loaded': sorted(m for m "
              "in ('mlflow', 'timm', 'aim_kedro.aim.model', 'aim_kedro.pipelines.evaluation') "
              "if m in sys.modules)}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"entries": True, "loaded": []}


def test_versions_command_lists_an_entry_s_versions_newest_first(cli_project) -> None:
    project = cli_project["path"]
    calls = ((("versions", "raw_pool"), "aim-kedro"), (("versions",), "kedro"),
             (("versions", "raw_pol"), "aim-kedro"))
    result, everything, typo = kedro_cli_all(project, list(calls))  # they only read
    assert result.returncode == 0, result.stdout
    versions = _versions(project / "data/01_raw/raw_pool")
    lines = [line.split() for line in result.stdout.splitlines() if VERSION.match(line.strip())]
    assert [line[0] for line in lines] == versions
    assert " ".join(lines[-1][1:]) == "kedro run --pipelines sample"
    assert everything.returncode == 0
    row = next(line.split() for line in everything.stdout.splitlines() if line.startswith("raw_pool "))
    assert row[1:] == [str(len(versions)), versions[0]]
    assert typo.returncode == 2 and "did you mean 'raw_pool'?" in typo.stdout
