"""The Ray Data executor of the curation pipeline: same results as the local path, its config
fails early, and `-e ray` changes only the executor. Ray runs locally (2 CPUs), no cluster."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import ray
from conftest import PROJECT, curation_catalog, curation_params, tiny_curation_inputs
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, Version
from kedro.runner import SequentialRunner
from polars.testing import assert_frame_equal

from aim_kedro import settings
from aim_kedro.curation.ray_engine import ExecutorConfig
from aim_kedro.datasets import WebDatasetShards
from aim_kedro.pipelines.curation import create_pipeline
from aim_kedro.pipelines.curation.nodes import validate_curation_params

COMPARED = ("pool_index", "clip_scores", "clip_embeddings", "face_boxes", "pool_manifest",
            "dfn_manifest")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray of 2 CPUs for this module, shut down afterwards."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def _samples(catalog: DataCatalog) -> list[tuple[Any, ...]]:
    return [(s["__key__"], s["png"], s["txt"], s["json"]) for s in catalog.load("dfn_subset")]


def test_ray_path_gives_the_local_manifest_and_subset(tmp_path: Path, local_ray: None) -> None:
    inputs = tiny_curation_inputs(tmp_path / "inputs")
    params = curation_params(keep_fraction=0.5, min_shorter_side=32)
    params["scoring"]["batch_size"] = 4  # shards of 6: two scoring batches per shard
    local = curation_catalog(tmp_path / "local", inputs)
    local["params:curation"] = params
    SequentialRunner().run(create_pipeline(), local)

    # The Ray run reads the pool through a file:// URL and writes the subset to memory://, and
    # reuses the local run's filtering network, so any difference is the executor's.
    on_ray = curation_catalog(tmp_path / "ray", {**inputs, "raw_pool": f"file://{inputs['raw_pool']}"})
    on_ray["params:curation"] = {**copy.deepcopy(params), "executor": {"kind": "ray"}}
    on_ray["filter_network"] = local.load("filter_network")
    on_ray["dfn_subset"] = WebDatasetShards(
        filepath=f"memory://{tmp_path.name}/dfn_subset", version=Version(None, None)
    )
    pipeline = create_pipeline()
    SequentialRunner().run(
        pipeline.only_nodes(*(n.name for n in pipeline.nodes if n.name != "train_filter_network")),
        on_ray,
    )

    assert on_ray.load("curation_index_stats")["executor"] == "ray"
    assert on_ray.load("curation_scoring_stats")["executor"] == "ray"
    assert on_ray.load("curation_face_stats")["executor"] == "ray"
    for name in COMPARED:
        assert_frame_equal(on_ray.load(name), local.load(name), check_exact=True)
    manifest = on_ray.load("pool_manifest")
    kept = manifest.filter(pl.col("kept"))["uid"].to_list()
    assert 0 < len(kept) < manifest.height
    samples = _samples(on_ray)
    assert samples == _samples(local)
    assert sorted(key for key, *_ in samples) == sorted(kept)
    assert on_ray.load("curation_subset_stats")["written"] == len(kept)


def test_executor_parameters_fail_before_any_work_and_name_the_fix() -> None:
    params = curation_params()
    assert validate_curation_params(params).executor == ExecutorConfig(kind="local")
    bad = {
        "kind": ("rey", r"curation\.executor\.kind must be one of \['local', 'ray'\]"),
        "scoring_actors": (0, r"curation\.executor\.scoring_actors must be >= 1"),
        "gpus_per_actor": ("all", r"curation\.executor\.gpus_per_actor must be auto or a number"),
        "num_cpus": (1.5, r"curation\.executor\.num_cpus must be a CPU count"),
        "scoring_batch_size": (0, r"curation\.executor\.scoring_batch_size must be >= 1"),
        "workers": (4, r"unknown curation\.executor parameter\(s\) \['workers'\]"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            validate_curation_params({**params, "executor": {"kind": "ray", key: value}})


def test_ray_environment_only_switches_the_executor() -> None:
    def curation(env: str) -> dict[str, Any]:
        loader = OmegaConfigLoader(str(PROJECT / "conf"), **{
            **settings.CONFIG_LOADER_ARGS, "default_run_env": env,
        })
        return dict(loader["parameters"]["curation"])

    base, on_ray = curation("base"), curation("ray")
    executor = validate_curation_params(on_ray).executor
    assert executor.kind == "ray" and executor.gpus_per_actor == "auto"
    assert base["executor"]["kind"] == "local"
    assert {k: v for k, v in on_ray.items() if k != "executor"} == {
        k: v for k, v in base.items() if k != "executor"
    }
