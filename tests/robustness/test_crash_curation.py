"""A curation run killed with SIGKILL in the middle of scoring resumes from its finished shards
(`kedro run --pipeline curation --only-missing-outputs`) and ends with the same pool_manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import curation_params, noise_png, sigkill_when
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from aim_kedro.io.shards import write_shards

SHARDS = 6
# The child is the real `kedro run`, with a scorer slowed to 1 s a batch (two batches a shard: a
# big model on a big pool), so the kill surely lands between two shards.
CHILD = """
import sys, time
from pathlib import Path
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
import aim_kedro.curation.pool_scoring as pool_scoring

torch.set_num_threads(1)
score_shard = pool_scoring.score_shard
pool_scoring.score_shard = lambda *a, **k: (score_shard(*a, **k), time.sleep(1.0))[0]
root = Path(sys.argv[1])
bootstrap_project(root)
with KedroSession.create(project_path=root) as session:
    session.run(pipeline_names=["curation"], to_nodes=["build_pool_manifest"])
"""


def _project(root: Path, make_project_copy) -> Path:
    """A project copy whose conf/local points the curation inputs at a 6-shard test pool."""
    project = make_project_copy(root / "project")
    inputs = root / "inputs"
    pool = [{"__key__": f"k{i:03d}", "png": noise_png(i, 48), "txt": f"picture number {i}",
             "json": {"uid": f"{i:032x}"}} for i in range(SHARDS * 8)]
    trusted = [{"__key__": f"t{i}", "png": noise_png(500 + i, 48), "txt": f"trusted picture {i}"}
               for i in range(16)]
    probe = [{"__key__": f"p{i}", "png": noise_png(900 + i, 48), "cls": str(i)} for i in range(4)]
    for name, samples, per_shard in (("raw_pool", pool, 8), ("trusted_pairs", trusted, 16),
                                     ("probe_test", probe, 4)):
        write_shards(samples, str(inputs / name), samples_per_shard=per_shard)
    catalog = {name: {"type": "aim_kedro.datasets.WebDatasetShards", "filepath": str(inputs / name)}
               for name in ("raw_pool", "trusted_pairs", "probe_test")}
    params = curation_params(keep_fraction=0.5)
    params["scoring"]["batch_size"] = 4
    (project / "conf/local/catalog.yml").write_text(yaml.safe_dump(catalog))
    (project / "conf/local/parameters_curation.yml").write_text(
        yaml.safe_dump({"curation": params})
    )
    return project


def _entries(project: Path) -> list[Path]:
    return sorted((project / "data/04_feature/clip_score_cache").rglob("shard-*.npz"))


def _latest(project: Path, relative: str) -> Path:
    folder = project / relative
    return sorted(folder.iterdir())[-1] / folder.name


def _run(project: Path, **kwargs) -> None:
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["curation"], to_nodes=["build_pool_manifest"], **kwargs)


@pytest.mark.slow
def test_sigkill_mid_scoring_then_resume_matches_uninterrupted(tmp_path: Path, make_project_copy) -> None:
    project = _project(tmp_path, make_project_copy)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(project)], cwd=project)
    sigkill_when(proc, lambda: len(_entries(project)) >= 2, 180, "scoring two shards")
    finished = len(_entries(project))
    assert 2 <= finished < SHARDS
    assert not (project / "data/04_feature/clip_scores.parquet").exists()

    bootstrap_project(project)
    _run(project, only_missing_outputs=True)
    stats = json.loads(_latest(project, "data/08_reporting/curation_stats/scoring.json").read_text())
    assert stats["resumed_shards"] == finished and stats["scored_shards"] == SHARDS - finished
    assert len(list((project / "data/06_models/filter_network").iterdir())) == 1, (
        "the resumed run trained the filter network again instead of reusing it")
    resumed = pl.read_parquet(_latest(project, "data/03_primary/pool_manifest.parquet"))

    # the same stage from scratch: no cache, same index and filter network
    for entry in _entries(project):
        entry.unlink()
    _run(project, from_nodes=["score_pool"])
    stats = json.loads(_latest(project, "data/08_reporting/curation_stats/scoring.json").read_text())
    assert stats["resumed_shards"] == 0 and stats["scored_shards"] == SHARDS
    uninterrupted = pl.read_parquet(_latest(project, "data/03_primary/pool_manifest.parquet"))
    assert resumed.height == SHARDS * 8 and int(resumed["kept"].sum()) == SHARDS * 4
    assert resumed.equals(uninterrupted)
