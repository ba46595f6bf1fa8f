"""A disk that fills during a save: a clear error naming the entry and the free space, no
partial version, the previous version intact and the work cache uncorrupted.

The fault is real: the save runs in a child process whose file-size limit (RLIMIT_FSIZE) stops a
write half-way with EFBIG, as a full disk stops it with ENOSPC.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import kedro_cli
from kedro.io import Version

from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.datasets import WebDatasetShards
from aim_kedro.datasets.atomic import EagerPolarsDataset

LIMIT = 256 * 1024

CHILD = """
import json, resource, sys
import numpy as np, polars as pl
from kedro.io import Version
from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.datasets import WebDatasetShards
from aim_kedro.datasets.atomic import EagerPolarsDataset

kind, path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
rng = np.random.default_rng(0)
try:
    if kind == "shards":
        samples = ({"__key__": f"{i:06d}", "bin": rng.bytes(64 * 1024), "json": {"uid": str(i)}}
                   for i in range(40))
        WebDatasetShards(filepath=path, samples_per_shard=100, version=Version(None, None)).save(samples)
    elif kind == "parquet":
        frame = pl.DataFrame({"blob": [rng.bytes(64 * 1024) for _ in range(40)]})
        EagerPolarsDataset(filepath=path, file_format="parquet", version=Version(None, None)).save(frame)
    else:
        ShardResultCache(path).save("score/big", {"x": rng.random(200_000)})
except Exception as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
    sys.exit(3)
print(json.dumps({"type": None}))
"""


def _save_under_limit(kind: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(LIMIT)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_a_shard_folder_save_that_fills_the_disk_keeps_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "data" / "raw_pool"
    small = [{"__key__": f"{i:06d}", "txt": f"caption {i}", "json": {"uid": str(i)}} for i in range(3)]
    WebDatasetShards(filepath=str(path), version=Version(None, None)).save(small)
    (previous,) = [p.name for p in path.iterdir()]
    error = _save_under_limit("shards", path)
    assert error["type"] == "NoSpaceError"
    assert error["message"].startswith("saving `raw_pool` to ")
    assert "the file size limit is reached" in error["message"] and " free on the disk" in error["message"]
    assert f"the previous version {previous} is intact" in error["message"]
    assert [p.name for p in path.iterdir()] == [previous], "a partial version was left"
    assert not _hidden(tmp_path), "the temporary folder of the failed save was left"
    assert WebDatasetShards(filepath=str(path), version=Version(None, None)).load().count() == 3


def test_a_table_save_that_fills_the_disk_keeps_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "pool_index.parquet"
    EagerPolarsDataset(filepath=str(path), file_format="parquet",
                       version=Version(None, None)).save(pl.DataFrame({"a": [1, 2]}))
    (previous,) = [p.name for p in path.iterdir()]
    error = _save_under_limit("parquet", path)
    assert error["type"] == "NoSpaceError", error
    assert "saving `pool_index`" in error["message"] and previous in error["message"]
    assert [p.name for p in path.iterdir()] == [previous]
    assert not _hidden(tmp_path)
    loaded = EagerPolarsDataset(filepath=str(path), file_format="parquet",
                                version=Version(None, None)).load()
    assert loaded["a"].to_list() == [1, 2]


def test_a_cache_entry_that_fills_the_disk_leaves_the_cache_as_it_was(tmp_path: Path) -> None:
    import numpy as np

    cache = ShardResultCache(str(tmp_path / "cache"))
    cache.save("score/small", {"x": np.arange(4)})
    error = _save_under_limit("cache", tmp_path / "cache")
    assert error["type"] == "OSError" and "File too large" in error["message"]
    assert cache.keys() == ["score/small"]
    assert cache.load("score/small")["x"].tolist() == [0, 1, 2, 3]
    assert not _hidden(tmp_path), "the failed entry's temporary file was left"


@pytest.mark.slow
def test_a_run_that_fills_the_disk_says_so_and_loses_nothing(cli_project) -> None:
    """`kedro run --pipelines sample` under a file-size limit: the message alone, naming the
    entry and the free space; every entry keeps its newest version."""
    project = cli_project["path"]
    before = {p: sorted(x.name for x in p.iterdir()) for p in (project / "data/01_raw").iterdir()
              if p.is_dir()}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    result = kedro_cli(project, "run", "--pipelines", "sample", preexec_fn=limit)
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert re.search(r"Error \(NoSpaceError\): (\w+): saving `\1` to data/01_raw/\1 failed", out), out[-3000:]
    assert " free on the disk" in out, out[-3000:]
    assert "is intact and stays the newest" in out and "Traceback" not in out, out[-3000:]
    after = {p: sorted(x.name for x in p.iterdir()) for p in (project / "data/01_raw").iterdir()
             if p.is_dir()}
    assert after == before
    assert not _hidden(project / "data")
