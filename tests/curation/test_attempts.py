"""The index accounts for every attempted sample: img2dataset's failures, unreadable shards,
uid lists, and the sidecars' url and extra columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import noise_png
from loopback import Faults, serve

from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.io.uids import default_uid, to_datacomp

NO_WAIT = {"read_retries": 2, "read_backoff_s": 0.0}


def img2dataset_shard(folder: Path, shard: int, keys: range, failed: dict[int, str]) -> None:
    """A shard as img2dataset writes it: {shard:05d}.tar of the successes, .parquet with every
    attempted sample (status, error_message, url, an additional column) and _stats.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, samples = [], []
    for k in keys:
        key = f"{shard:05d}{k:04d}"
        status = failed.get(k, "success")
        rows.append({"key": key, "url": f"http://img/{key}.png", "caption": f"picture {k}",
                     "status": status, "error_message": None if status == "success" else
                     f"{status}: HTTP Error 404", "license": f"cc-{k}"})
        if status == "success":
            samples.append({"__key__": key, "png": noise_png(shard * 100 + k), "txt": f"picture {k}",
                            "json": {"url": f"http://img/{key}.png", "key": key, "status": status}})
    (path,) = write_shards(samples, str(folder / "tmp"), 10_000)
    Path(path).rename(folder / f"{shard:05d}.tar")
    (folder / "tmp").rmdir()
    pl.DataFrame(rows).write_parquet(folder / f"{shard:05d}.parquet")
    counts = {"failed_to_download": 0, "failed_to_resize": 0}
    for status in failed.values():
        counts[status] += 1
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
        {"count": len(keys), "successes": len(keys) - len(failed), **counts}))


def _pool(root: Path) -> Path:
    img2dataset_shard(root / "pool", 0, range(6), {1: "failed_to_download", 4: "failed_to_resize"})
    img2dataset_shard(root / "pool", 1, range(5), {0: "failed_to_download"})
    return root / "pool"


def test_failed_downloads_are_rows_and_sidecar_columns_are_carried(tmp_path: Path) -> None:
    index, summary = build_index(ShardSet.open(str(_pool(tmp_path))), IndexConfig(), progress=False)
    assert index.height == 11 == summary["samples"]  # what was attempted, not what was written
    reasons = dict(zip(index["key"], index["reject_reason"], strict=True))
    assert reasons["000000001"] == reasons["000010000"] == "failed_download"
    assert reasons["000000004"] == "failed_resize"
    assert sum(r is None for r in reasons.values()) == 8
    failed = index.filter(pl.col("key") == "000000001").row(0, named=True)
    assert failed["reject_detail"] == "failed_to_download: HTTP Error 404"
    assert failed["uid"] == default_uid("00000.tar", "000000001") and failed["caption"] == "picture 1"
    assert index["url"].to_list() == [f"http://img/{k}.png" for k in index["key"]]
    assert index["license"].to_list() == [f"cc-{int(k[-4:])}" for k in index["key"]]


def test_a_listed_sample_missing_from_its_shard_is_corrupt_not_lost(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    table = pl.read_parquet(pool / "00001.parquet")
    extra = {**table.row(1, named=True), "key": "000019999", "status": "success"}
    pl.concat([table, pl.DataFrame([extra], schema=table.schema)]).write_parquet(pool / "00001.parquet")
    index, _ = build_index(ShardSet.open(str(pool)), IndexConfig(), progress=False)
    row = index.filter(pl.col("key") == "000019999").row(0, named=True)
    assert row["reject_reason"] == "corrupt" and "not in the shard" in row["reject_detail"]


def test_a_uid_list_restricts_the_pool_before_decoding(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    everything, _ = build_index(ShardSet.open(str(pool)), IndexConfig(), progress=False)
    wanted = everything.filter(pl.col("reject_reason").is_null())["uid"].to_list()[::2]
    np.save(tmp_path / "subset.npy", to_datacomp(wanted))
    cfg = IndexConfig(uid_list=str(tmp_path / "subset.npy"))
    index, summary = build_index(ShardSet.open(str(pool)), cfg, progress=False)
    assert summary["uid_list"]["uids"] == len(wanted)
    kept = index.filter(pl.col("reject_reason").is_null())
    assert sorted(kept["uid"]) == sorted(wanted)
    out = index.filter(pl.col("reject_reason") == "not_in_uid_list")
    assert out.height == 11 - len(wanted) and out["width"].null_count() == out.height
    with pytest.raises(FileNotFoundError, match="curation.index.uid_list"):
        IndexConfig(uid_list=str(tmp_path / "absent.npy")).load_uid_list()


def _comparable(index: pl.DataFrame) -> pl.DataFrame:
    return index.select("uid", "shard", "key", "position", "sha256_pixels", "reject_reason")


@pytest.mark.parametrize("sidecar_down", [False, True], ids=["sidecar-lists-it", "all-down"])
def test_a_shard_that_stays_unavailable_is_recorded_and_the_rest_is_as_if_it_were_absent(
    tmp_path: Path, sidecar_down: bool
) -> None:
    pool = _pool(tmp_path)
    cfg = IndexConfig(**NO_WAIT)
    faults = Faults(unavailable={"00001" if sidecar_down else "00001.tar": -1})
    with serve(tmp_path, faults=faults) as (url, _):
        index, _ = build_index(ShardSet.open(f"{url}/pool/"), cfg, progress=False)
    bad = index.filter(pl.col("shard") == "00001.tar")
    assert set(bad["reject_reason"]) == {"unreadable_shard"} if sidecar_down else \
        set(bad["reject_reason"]) == {"unreadable_shard", "failed_download"}
    assert bad.height == (1 if sidecar_down else 5)
    assert all("503" in d for d in bad.filter(pl.col("reject_reason") == "unreadable_shard")
               ["reject_detail"])
    alone = ShardSet.open(str(pool))
    alone = ShardSet(path=alone.path, shards=alone.shards[:1], names=alone.names[:1])
    reference, _ = build_index(alone, cfg, progress=False)
    assert _comparable(index.filter(pl.col("shard") != "00001.tar")).equals(_comparable(reference))
    with serve(tmp_path) as (url, _):  # the server is back: a later run reads it all
        again, _ = build_index(ShardSet.open(f"{url}/pool/"), cfg, progress=False)
    local, _ = build_index(ShardSet.open(str(pool)), cfg, progress=False)
    assert _comparable(again).equals(_comparable(local))
