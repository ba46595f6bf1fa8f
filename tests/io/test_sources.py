"""Shard specs (folders, URLs, brace ranges, pipe:, several roots) and reads that survive faults."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from loopback import Faults, closed_port, serve

from aim_kedro.io.shards import ERROR_KEY, ShardSet, read_shard, write_shards
from aim_kedro.io.sources import ReadRetry, UnreadableShardError, expand_braces, resolve

NO_WAIT = ReadRetry(retries=3, backoff_s=0.0)


def _pool(root: Path, runs: tuple[str, ...] = ("",), per_run: int = 6, per_shard: int = 3) -> None:
    """img2dataset-like runs under ``root``: shards 00000.tar, 00001.tar, ... per run."""
    for run in runs:
        folder = root / run if run else root
        samples = [{"__key__": f"{i:09d}", "txt": f"{run} caption {i}", "json": {"url": f"u{i}"}}
                   for i in range(per_run)]
        for i, path in enumerate(write_shards(samples, str(folder), per_shard, prefix="tmp")):
            Path(path).rename(folder / f"{i:05d}.tar")


def _texts(shards: ShardSet) -> list[bytes]:
    return [s["txt"] for s in shards]


def test_brace_expansion_follows_webdataset() -> None:
    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("s3://b/{x,y}/{8..10}.tar") == [
        "s3://b/x/8.tar", "s3://b/x/9.tar", "s3://b/x/10.tar",
        "s3://b/y/8.tar", "s3://b/y/9.tar", "s3://b/y/10.tar",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("a/{0..2.tar")


def test_two_runs_under_one_root_keep_apart_by_relative_path(tmp_path: Path) -> None:
    _pool(tmp_path / "pool", runs=("run1", "run2"))
    shards = ShardSet.open(str(tmp_path / "pool"))
    assert shards.names == ["run1/00000.tar", "run1/00001.tar", "run2/00000.tar", "run2/00001.tar"]
    assert {s["__shard__"] for s in shards} == set(shards.names)
    assert len(_texts(shards)) == 12


def test_a_list_of_roots_and_a_brace_range(tmp_path: Path) -> None:
    _pool(tmp_path / "pool", runs=("run1", "run2"))
    listed = ShardSet.open([str(tmp_path / "pool" / "run1"), str(tmp_path / "pool" / "run2")])
    assert listed.names == ["run1/00000.tar", "run1/00001.tar", "run2/00000.tar", "run2/00001.tar"]
    braces = ShardSet.open(str(tmp_path / "pool" / "run{1,2}" / "{00000..00001}.tar"))
    assert braces.names == listed.names
    assert _texts(braces) == _texts(listed)
    with pytest.raises(ValueError, match="same shard twice"):
        resolve([str(tmp_path / "pool" / "run1"), str(tmp_path / "pool" / "run1")])


def test_pipe_commands_stream_a_tar_and_a_failing_one_is_unreadable(tmp_path: Path) -> None:
    _pool(tmp_path / "pool")
    local = ShardSet.open(str(tmp_path / "pool"))
    piped = ShardSet.open(f"pipe:cat {tmp_path}/pool/{{00000..00001}}.tar")
    assert piped.names == ["00000.tar", "00001.tar"]
    assert _texts(piped) == _texts(local)
    with pytest.raises(UnreadableShardError, match="status 1"):
        list(read_shard(f"pipe:cat {tmp_path}/nowhere.tar", retry=ReadRetry(1, 0.0)))


def test_memory_filesystem_is_a_root_like_any_other(tmp_path: Path) -> None:
    _pool(tmp_path / "pool", runs=("a",))
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in sorted((tmp_path / "pool" / "a").iterdir()):
        memory.pipe(f"/i13/pool/a/{path.name}", path.read_bytes())
    shards = ShardSet.open("memory://i13/pool")
    assert shards.names == ["a/00000.tar", "a/00001.tar"]
    assert len(_texts(shards)) == 6


@pytest.mark.parametrize("ranges", [True, False], ids=["range-server", "plain-server"])
def test_a_pool_over_http_reads_like_the_local_one(tmp_path: Path, ranges: bool) -> None:
    _pool(tmp_path / "pool", runs=("run1", "run2"))
    local = ShardSet.open(str(tmp_path / "pool"))
    with serve(tmp_path, ranges=ranges) as (url, _):
        remote = ShardSet.open(f"{url}/pool/")
        assert remote.shards[0] == f"{url}/pool/run1/00000.tar"  # the protocol once
        assert remote.names == local.names
        assert _texts(remote) == _texts(local)
        braces = ShardSet.open(f"{url}/pool/run2/{{00000..00001}}.tar")
        assert braces.names == ["00000.tar", "00001.tar"]
        assert _texts(braces) == _texts(local)[6:]


def test_an_unreachable_server_fails_with_its_cause() -> None:
    with pytest.raises(OSError, match="(?i)connect"):
        ShardSet.open(f"http://127.0.0.1:{closed_port()}/pool/")


def test_dropped_transfers_and_503s_are_retried_and_nothing_repeats(tmp_path: Path) -> None:
    _pool(tmp_path / "pool", per_run=200, per_shard=200)
    (local_shard,) = ShardSet.open(str(tmp_path / "pool")).shards
    expected = [s["txt"] for s in read_shard(local_shard)]
    faults = Faults(unavailable={"00000.tar": 2}, drops={"00000.tar": 2})
    with serve(tmp_path, ranges=False, faults=faults) as (url, _):
        got = [s["txt"] for s in read_shard(f"{url}/pool/00000.tar", retry=NO_WAIT)]
    assert got == expected
    assert faults.drops["00000.tar"] == 0 and faults.unavailable["00000.tar"] == 0


def test_a_shard_that_stays_unavailable_is_unreadable_with_the_cause(tmp_path: Path) -> None:
    _pool(tmp_path / "pool")
    with serve(tmp_path, faults=Faults(unavailable={"00001.tar": -1})) as (url, _):
        with pytest.raises(UnreadableShardError, match="503") as info:
            list(read_shard(f"{url}/pool/00001.tar", name="00001.tar", retry=ReadRetry(2, 0.0)))
    assert info.value.attempts == 3 and info.value.shard == "00001.tar"


def test_a_truncated_tar_on_the_server_is_damage_not_a_transfer_fault(tmp_path: Path) -> None:
    _pool(tmp_path / "pool", per_run=10, per_shard=10)
    shard = tmp_path / "pool" / "00000.tar"
    data = shard.read_bytes()
    shutil.copy(shard, tmp_path / "whole.tar")
    shard.write_bytes(data[: len(data) // 2])
    with serve(tmp_path) as (url, faults):
        out = list(read_shard(f"{url}/pool/00000.tar", retry=NO_WAIT))
    assert out[-1][ERROR_KEY].startswith("truncated_tar")
    assert sum(n for (method, _), n in faults.requests.items() if method == "GET") == 1
