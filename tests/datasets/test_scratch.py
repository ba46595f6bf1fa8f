"""Temporary files of saves: a sweep removes those whose process is gone, never a live one's,
and puts back a copy that a replacement pushed aside when the replacement never landed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aim_kedro.datasets._scratch import HOST_TAG, scratch_name, stale, sweep


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _name(kind: str, pid: int, label: str, host: str = HOST_TAG) -> str:
    return f".{kind}-{pid}.{host}-0123abcd-{label}"


def test_a_sweep_removes_only_the_temporaries_of_ended_processes(tmp_path: Path) -> None:
    dead = _dead_pid()
    killed = tmp_path / _name("tmp", dead, "raw_pool-2026-01-01T00.00.00.000Z")
    (killed / "raw_pool").mkdir(parents=True)
    (killed / "raw_pool" / "shard-000000.tar").write_bytes(b"half a shard")
    killed_file = tmp_path / _name("tmp", dead, "pool_index.parquet")
    killed_file.write_bytes(b"half a file")
    live = tmp_path / scratch_name("tmp", "probe_test-2026-01-01T00.00.00.000Z")
    live.mkdir()
    other_host = tmp_path / _name("tmp", dead, "x.json", host="ffffffff" if HOST_TAG != "ffffffff" else "00000000")
    other_host.write_text("{}")
    legacy = tmp_path / ".tmp-0a1b2c3d4e5f-old.json"
    legacy.write_text("{}")
    entry = tmp_path / "raw_pool"
    entry.mkdir()
    assert stale(killed.name) and not stale(live.name) and not stale(other_host.name)
    removed = sweep(tmp_path)
    assert sorted(removed) == sorted([str(killed), str(killed_file)])
    assert live.exists() and other_host.exists() and legacy.exists() and entry.exists()


def test_a_copy_pushed_aside_comes_back_when_its_replacement_never_landed(tmp_path: Path) -> None:
    dead = _dead_pid()
    old = tmp_path / _name("old", dead, "secondary_pool")
    old.mkdir()
    (old / "shard-000000.tar").write_bytes(b"the previous copy")
    new = tmp_path / _name("tmp", dead, "secondary_pool")
    new.mkdir()
    sweep(tmp_path)
    assert (tmp_path / "secondary_pool" / "shard-000000.tar").read_bytes() == b"the previous copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secondary_pool"]
    stale_old = tmp_path / _name("old", dead, "secondary_pool")  # the target exists now
    stale_old.mkdir()
    sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secondary_pool"]


def test_a_sweep_of_a_folder_that_does_not_exist_is_empty(tmp_path: Path) -> None:
    assert sweep(tmp_path / "nothing") == []
