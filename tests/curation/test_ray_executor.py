"""The Ray Data executor of the curation pipeline: same results as the local path, its config
fails early, and `-e ray` changes only the executor. Ray runs locally (2 CPUs), no cluster."""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import ray
from conftest import PROJECT, add_params, curation_catalog, curation_params, tiny_curation_inputs
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, Version
from kedro.runner import SequentialRunner
from polars.testing import assert_frame_equal

from aim_kedro import settings
from aim_kedro.curation.executors import ExecutorConfig
from aim_kedro.datasets import WebDatasetShards
from aim_kedro.pipelines.curation import create_pipeline
from aim_kedro.pipelines.curation.nodes import validate_curation_params

COMPARED = ("pool_index", "clip_scores", "clip_embeddings", "nsfw_scores", "face_boxes",
            "pool_manifest", "dfn_manifest")


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
    add_params(local, "curation", params)
    SequentialRunner().run(create_pipeline(), local)

    # The Ray run reads the pool through a file:// URL and writes the subset to memory://, and
    # reuses the local run's filtering network, so any difference is the executor's.
    on_ray = curation_catalog(tmp_path / "ray", {**inputs, "raw_pool": f"file://{inputs['raw_pool']}"})
    add_params(on_ray, "curation", {**copy.deepcopy(params), "executor": {"kind": "ray"}})
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
    assert on_ray.load("curation_nsfw_stats")["executor"] == "ray"
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
        "actors": (4, r"unknown curation\.executor parameter\(s\) \['actors'\]"),
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


# --- the executor itself, on small work functions (shipped to the workers by value) ----------


def _items(task, n: int) -> Iterator[str]:
    return (f"{task.order}:{i}" for i in range(n * (task.order + 1) if task.order != 1 else 0))


def _parts(task) -> list[int]:
    return list(range(task.order + 1)) if task.order != 1 else []


def _apply(model: str, part: int) -> str:
    return f"{model}{part}"


def test_ray_executor_keeps_task_order_across_blocks_and_empty_tasks(
    tmp_path: Path, local_ray: None
) -> None:
    import sys

    from ray import cloudpickle

    from aim_kedro.curation.executors import ModelStage, shard_tasks
    from aim_kedro.curation.ray_executor import ITEMS_PER_BLOCK, RayExecutor
    from aim_kedro.io.shards import ShardSet, write_shards

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    write_shards([{"__key__": f"k{i}", "txt": "x"} for i in range(3)], str(tmp_path),
                 samples_per_shard=1)
    tasks = shard_tasks(ShardSet.open(str(tmp_path)))
    executor = RayExecutor(ExecutorConfig(kind="ray"), progress=False)
    n = ITEMS_PER_BLOCK + 5  # task 0: 2 blocks, task 1: nothing, task 2: 4 blocks
    assert list(executor.stream_shards(functools.partial(_items, n=n), tasks)) == [
        f"{t}:{i}" for t in (0, 2) for i in range(n * (t + 1))]
    assert executor.map_shards(_parts, tasks) == [[0], [], [0, 1, 2]]
    assert list(executor.map_model(ModelStage(lambda: "m", _parts, _apply), tasks)) == [
        ["m0"], [], ["m0", "m1", "m2"]]
    assert executor.model_here(lambda: "m") is None
    assert executor.describe(want_gpu=False) == {"executor": "ray", "scoring_actors": 1,
                                                 "gpus_per_actor": 0.0}
