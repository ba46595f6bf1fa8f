"""The run hook's checks: which parameter blocks a pipeline reads, unknown top-level keys,
entries that one node writes loaded from one run, and the message of an input that is missing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import polars as pl
import pytest
from kedro.io import DataCatalog, Version
from kedro.pipeline import Pipeline, node

from aim_kedro.checks import check_inputs, check_top_level, runtime_paths
from aim_kedro.datasets.atomic import EagerPolarsDataset, JSONDataset
from aim_kedro.hooks import RunManifestHooks, parameter_blocks
from aim_kedro.lineage import align_groups, producers


def _f(*args):
    return 1


def test_parameter_blocks_reads_nested_params() -> None:
    pipe = Pipeline([
        node(_f, ["a", "params:curation.filters"], "b", name="n1"),
        node(_f, ["b", "params:pretraining"], "c", name="n2"),
    ])
    assert parameter_blocks(pipe) == {"curation", "pretraining"}


def test_an_unknown_top_level_key_names_the_closest_block() -> None:
    known = {"curation": {}, "sample": {}}
    check_top_level({"curation": {}}, known)
    with pytest.raises(ValueError, match=r"\['curaton'\].*'curaton' -> 'curation'"):
        check_top_level({"curaton": {"filters": {}}, "curation": {}}, known)
    assert runtime_paths({"curation": {"filters": {"keep_fraction": 0.1}}, "x": 1}) == [
        "curation.filters.keep_fraction", "x"]


MAKER = Pipeline([node(lambda: (1, 2, 3), None, ["pool", "truth", "pairs"], name="make"),
                  node(lambda: 4, None, "other", name="make_other")])
READER = Pipeline([node(_f, ["pool", "truth", "pairs", "other"], "out", name="read")])


def _catalog(root: Path, versions: dict[str, list[str]], pins: dict[str, str] | None = None):
    datasets = {}
    for name, saved in versions.items():
        path = str(root / f"{name}.parquet")
        for version in saved:
            EagerPolarsDataset(filepath=path, file_format="parquet",
                               version=Version(None, version)).save(pl.DataFrame({"v": [version]}))
        datasets[name] = EagerPolarsDataset(filepath=path, file_format="parquet",
                                            version=Version((pins or {}).get(name), None))
    return DataCatalog(datasets=datasets, load_versions=dict(pins or {}))


V1, V2 = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"


def test_pinning_one_entry_loads_the_entries_its_node_wrote_at_the_same_version(tmp_path) -> None:
    catalog = _catalog(tmp_path, {n: [V1, V2] for n in ("pool", "truth", "pairs", "other")},
                       pins={"pool": V1})
    notes, warnings = align_groups(READER, catalog, {"pool": V1}, producers({"maker": MAKER}))
    assert notes == [f"loading pairs, truth at version {V1}, like pool (node make wrote them together)"]
    assert warnings == []
    assert catalog.load("truth")["v"].to_list() == [V1] == catalog.load("pairs")["v"].to_list()
    assert catalog.load("other")["v"].to_list() == [V2]  # another node's entry: the newest


def test_entries_of_one_node_from_different_runs_are_warned_about(tmp_path) -> None:
    catalog = _catalog(tmp_path, {"pool": [V1, V2], "truth": [V2], "pairs": [V1], "other": [V1]},
                       pins={"pool": V1})
    notes, warnings = align_groups(READER, catalog, {"pool": V1}, producers({"maker": MAKER}))
    assert notes == [f"loading pairs at version {V1}, like pool (node make wrote them together)"]
    (warning,) = warnings
    assert f"truth {V2}" in warning and f"pool {V1}" in warning and "--load-versions" in warning


def test_a_missing_input_is_named_with_its_versions_and_its_maker(tmp_path) -> None:
    catalog = _catalog(tmp_path, {"pool": [V1, V2], "truth": [], "pairs": [V1]},
                       pins={"pool": "2020-01-01T00.00.00.000Z"})
    made_by = producers({"maker": MAKER})
    with pytest.raises(FileNotFoundError) as error:
        check_inputs(READER, catalog, made_by, {"pool": "2020-01-01T00.00.00.000Z"}, lambda n: [])
    text = str(error.value)
    assert "these 3 inputs of the run cannot be loaded" in text
    assert "version 2020-01-01T00.00.00.000Z (asked for with --load-versions) does not exist" in text
    assert f"Versions there, newest first: {V2}, {V1}." in text
    assert "`truth`: no saved version under" in text and "node make of pipeline maker" in text
    assert "`other` is handed over in memory within one run" in text
    assert "`--nodes make_other,read`" in text


def test_a_run_that_ends_after_a_later_one_saves_its_manifest_quietly(tmp_path) -> None:
    """Two runs side by side: the one that started first ends last. Its manifest lands under its
    own version, the newer run's stays, and no consistency warning reaches the user."""
    path = str(tmp_path / "run_manifest.json")
    JSONDataset(filepath=path, version=Version(None, V2)).save({"version": V2})
    catalog = DataCatalog(datasets={"run_manifest": JSONDataset(filepath=path,
                                                                 version=Version(None, V1))})
    hooks = RunManifestHooks()
    pipe = Pipeline([node(_f, None, "out", name="make_out")])
    hooks.before_pipeline_run({"run_id": V1, "pipeline_names": ["p"]}, pipe, catalog)
    hooks.after_node_run(pipe.nodes[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooks.after_pipeline_run()
    assert not [w for w in caught if "did not match load version" in str(w.message)]
    saved = json.loads((tmp_path / "run_manifest.json" / V1 / "run_manifest.json").read_text())
    assert saved["status"] == "completed" and saved["nodes"] == ["make_out"]
    newer = json.loads((tmp_path / "run_manifest.json" / V2 / "run_manifest.json").read_text())
    assert newer == {"version": V2}
