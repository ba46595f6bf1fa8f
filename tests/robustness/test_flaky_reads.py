"""A remote pool whose server drops transfers and answers 503 (issue 20, item 1), through the
curation pipeline: retried, a shard that stays down is recorded, the rest is as if it were
absent, and the next run picks the shard up."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import add_params, curation_catalog, curation_params, tiny_curation_inputs
from kedro.runner import SequentialRunner
from loopback import Faults, serve

from aim_kedro.pipelines.curation import create_pipeline

pytestmark = pytest.mark.slow
UP_TO_MANIFEST = create_pipeline().to_nodes("build_pool_manifest")


def _run(root: Path, inputs: dict[str, str], pool: str) -> dict[str, pl.DataFrame]:
    catalog = curation_catalog(root, {**inputs, "raw_pool": pool})
    params = curation_params(keep_fraction=0.5, min_shorter_side=32)
    params["index"].update(read_retries=2, read_backoff_s=0.0)
    params["subset"]["only_if_bigger"] = True
    add_params(catalog, "curation", params)
    SequentialRunner().run(UP_TO_MANIFEST, catalog)
    return {name: catalog.load(name) for name in ("pool_manifest", "curation_scoring_stats")}


def test_a_shard_that_stays_down_is_recorded_and_picked_up_later(tmp_path: Path) -> None:
    inputs = tiny_curation_inputs(tmp_path / "inputs")
    served = tmp_path / "inputs"
    down = "shard-000001.tar"
    faults = Faults(unavailable={down: -1, "shard-000002.tar": 2}, drops={"shard-000000.tar": 1})
    with serve(served, faults=faults) as (url, _):
        flaky = _run(tmp_path / "flaky", inputs, f"{url}/raw_pool/")
    manifest = flaky["pool_manifest"]
    lost = manifest.filter(pl.col("shard") == down)
    assert lost.height == 1 and lost["reject_reason"].to_list() == ["unreadable_shard"]
    assert "503" in lost["reject_detail"][0]
    assert faults.drops["shard-000000.tar"] == 0 and faults.unavailable["shard-000002.tar"] == 0

    without = tmp_path / "without"
    shutil.copytree(inputs["raw_pool"], without)
    (without / down).unlink()
    absent = _run(tmp_path / "absent", inputs, str(without))["pool_manifest"]
    columns = ["uid", "kept", "reject_reason", "clip_score"]
    assert manifest.filter(pl.col("shard") != down).select(columns).equals(absent.select(columns))

    with serve(served) as (url, _):  # the server is back; the same cache and outputs
        again = _run(tmp_path / "flaky", inputs, f"{url}/raw_pool/")
    recovered = again["pool_manifest"]
    assert recovered.height == 24 and "unreadable_shard" not in recovered["reject_reason"].to_list()
    stats = again["curation_scoring_stats"]
    assert stats["scored_shards"] >= 1 and stats["scored_shards"] + stats["resumed_shards"] == 4
