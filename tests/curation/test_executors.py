"""The executor interface: shard tasks, the local executor, and the choice of executor."""

from __future__ import annotations

import functools
from pathlib import Path

import polars as pl
import pytest
from conftest import noise_png

from aim_kedro.curation.executors import (
    ExecutorConfig,
    LocalExecutor,
    ModelStage,
    ShardTask,
    make_executor,
    shard_tasks,
)
from aim_kedro.io.shards import ShardSet, write_shards


@pytest.fixture
def pool(tmp_path: Path) -> ShardSet:
    write_shards([{"__key__": f"k{i}", "png": noise_png(i, 16), "txt": "x"} for i in range(7)],
                 str(tmp_path), samples_per_shard=3)
    return ShardSet.open(str(tmp_path))


def _rows(shards: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"uid": [f"u{i}" for i in range(len(shards))], "shard": shards,
                         "position": list(range(len(shards)))})


def test_tasks_are_one_shard_sets_with_their_rows(pool: ShardSet) -> None:
    every = shard_tasks(pool)
    assert [t.order for t in every] == [0, 1, 2] and all(t.rows is None for t in every)
    assert [t.path for t in every] == pool.shards
    assert all(t.shards.shards == [t.path] and t.shards.path == pool.path for t in every)
    rows = _rows(["shard-000002.tar", "shard-000000.tar", "shard-000002.tar"])
    by_pool = shard_tasks(pool, rows)
    assert [t.path.rsplit("/", 1)[-1] for t in by_pool] == ["shard-000000.tar", "shard-000002.tar"]
    assert by_pool[1].rows["uid"].to_list() == ["u0", "u2"]
    by_table = shard_tasks(pool, rows, order="table")
    assert [t.path.rsplit("/", 1)[-1] for t in by_table] == ["shard-000002.tar", "shard-000000.tar"]
    assert [t.order for t in by_table] == [0, 1]
    assert shard_tasks(pool, rows.clear()) == []
    with pytest.raises(ValueError, match=r"shard-000009\.tar.*re-run build_pool_index"):
        shard_tasks(pool, _rows(["shard-000009.tar"]))


def _count(task: ShardTask) -> int:
    return sum(1 for _ in task.shards.iter_shard(task.path))


def _keys(task: ShardTask, suffix: str) -> list[str]:
    return [s["__key__"] + suffix for s in task.shards.iter_shard(task.path)]


def test_local_executor_maps_and_streams_in_task_order(pool: ShardSet) -> None:
    local = LocalExecutor(progress=False)
    tasks = shard_tasks(pool)
    assert local.map_shards(_count, tasks) == [3, 3, 1]
    stream = local.stream_shards(functools.partial(_keys, suffix="!"), tasks)
    assert next(stream) == "k0!"  # a stream: nothing past the first item was read yet
    assert list(stream) == [f"k{i}!" for i in range(1, 7)]
    assert local.describe() == {"executor": "local"} == local.describe(want_gpu=True)


def _pid_and_count(task: ShardTask) -> tuple[int, int]:
    import os

    return os.getpid(), _count(task)


def _fail_on_short(task: ShardTask) -> int:
    if _count(task) < 3:
        raise ValueError(f"short shard {task.path}")
    return 3


def test_local_workers_map_shards_in_other_processes_with_the_same_results(pool) -> None:
    import os

    tasks = shard_tasks(pool)
    parallel = LocalExecutor(progress=False, workers=2).map_shards(_pid_and_count, tasks)
    assert [count for _, count in parallel] == [3, 3, 1]  # task order, as in this process
    assert os.getpid() not in {pid for pid, _ in parallel}
    with pytest.raises(ValueError, match=r"short shard .*shard-000002\.tar"):
        LocalExecutor(progress=False, workers=2).map_shards(_fail_on_short, tasks)
    assert LocalExecutor(progress=False, workers=None).workers == (os.cpu_count() or 1)
    assert make_executor(ExecutorConfig.from_dict({"workers": 3})).workers == 3
    with pytest.raises(ValueError, match=r"curation\.executor\.workers must be a process count"):
        ExecutorConfig.from_dict({"workers": 0})


def test_local_executor_builds_one_model_and_applies_it_per_part(pool: ShardSet) -> None:
    built = []

    def make() -> str:
        built.append(1)
        return "model"

    local = LocalExecutor(progress=False)
    stage = ModelStage(make, functools.partial(_keys, suffix=""), lambda m, key: f"{m}:{key}")
    out = list(local.map_model(stage, shard_tasks(pool)))
    assert out == [["model:k0", "model:k1", "model:k2"], ["model:k3", "model:k4", "model:k5"],
                   ["model:k6"]]
    assert local.model_here(make) == "model" and built == [1]
    assert list(local.map_model(ModelStage(make, _count, lambda m, p: p), [])) == []


def test_make_executor_follows_the_config() -> None:
    assert isinstance(make_executor(ExecutorConfig(), progress=False), LocalExecutor)
    assert make_executor(ExecutorConfig.from_dict({"kind": "ray"})).kind == "ray"
    with pytest.raises(ValueError, match=r"unknown curation\.executor parameter.*'kinds' -> 'kind'"):
        ExecutorConfig.from_dict({"kinds": "ray"})
