"""A save killed with SIGKILL half-way leaves no version that a later load would pick up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import sigkill_when
from kedro.io import Version

from aim_kedro.datasets import WebDatasetShards

CHILD = """
import sys, time
from kedro.io import Version
from aim_kedro.datasets import WebDatasetShards

def samples(n, slow):
    for i in range(n):
        if slow and i >= 3:
            time.sleep(0.5)  # a long save: the parent kills it here
        yield {"__key__": f"{i:06d}", "txt": f"caption {i}", "json": {"uid": f"{i:032x}"}}

path = sys.argv[1]
WebDatasetShards(filepath=path, samples_per_shard=1, version=Version(None, None)).save(samples(2, False))
time.sleep(0.01)  # versions are timestamps: the second must sort after the first
WebDatasetShards(filepath=path, samples_per_shard=1, version=Version(None, None)).save(samples(100, True))
"""


def test_sigkill_mid_save_leaves_the_previous_version_latest(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)])
    sigkill_when(proc, lambda: len(list(tmp_path.rglob("shard-*.tar"))) >= 2 + 3, 60,
                 "the second save writing 3 shards")
    assert len(list(tmp_path.rglob("shard-*.tar"))) >= 5, "the killed save had written shards"
    versions = [p for p in path.iterdir() if not p.name.startswith(".")]
    assert len(versions) == 1
    latest = WebDatasetShards(filepath=str(path), version=Version(None, None)).load()
    assert latest.count() == 2
