"""The uid rule across roots, and DataComp's uid lists (.npy of two uint64 per 128-bit uid)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from aim_kedro.io.uids import (
    UidList,
    default_uid,
    from_datacomp,
    sample_uid,
    to_datacomp,
)


def test_default_uids_come_from_the_relative_shard_path_and_key() -> None:
    a = sample_uid({"__key__": "000000000", "__shard__": "run1/00000.tar"})
    b = sample_uid({"__key__": "000000000", "__shard__": "run2/00000.tar"})
    assert a != b and len(a) == 32 and int(a, 16) >= 0
    assert a == default_uid("run1/00000.tar", "000000000")
    assert sample_uid({"__key__": "k", "json": b'{"uid": "abc"}'}) == "abc"


def test_datacomp_arrays_round_trip_sorted_in_the_resharders_dtype() -> None:
    uids = ["ff" * 16, "0a" * 16, "0a" * 16, "1"]
    array = to_datacomp(uids)
    assert array.dtype == np.dtype("u8,u8")  # what DataComp's resharder asserts
    assert from_datacomp(array) == ["0" * 31 + "1", "0a" * 16, "ff" * 16]
    assert list(array["f0"]) == sorted(array["f0"])
    buffer = io.BytesIO()
    np.save(buffer, array)
    assert from_datacomp(np.load(io.BytesIO(buffer.getvalue()))) == from_datacomp(array)
    hashed = to_datacomp(["uid000"])  # a pool's own uid: its sha256's first 128 bits
    assert "uid000" in UidList(hashed) and "uid001" not in UidList(hashed)
    assert from_datacomp(hashed) != ["uid000"]


def test_uid_list_membership_and_bad_files(tmp_path: Path) -> None:
    wanted = [f"{i:032x}" for i in range(0, 1000, 7)]
    np.save(tmp_path / "subset.npy", to_datacomp(wanted)[::-1])  # order is not trusted
    listed = UidList.load(str(tmp_path / "subset.npy"))
    assert len(listed) == len(wanted)
    assert all(uid in listed for uid in wanted)
    assert not any(f"{i:032x}" in listed for i in range(1, 1000, 7))
    assert "not-hex" not in listed and "" not in listed
    np.save(tmp_path / "wrong.npy", np.arange(4))
    with pytest.raises(ValueError, match="not a DataComp uid list"):
        UidList.load(str(tmp_path / "wrong.npy"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UidList.load(str(tmp_path / "absent.npy"))


def test_export_uids_warns_about_uids_that_are_not_hex(caplog) -> None:
    from aim_kedro.io.uids import export_uids

    hex_uid = "0123456789abcdef" * 2
    with caplog.at_level("WARNING"):
        array = export_uids([hex_uid])
    assert from_datacomp(array) == [hex_uid] and not caplog.records
    with caplog.at_level("WARNING"):
        array = export_uids([hex_uid, "shard-0/key-1"])
    assert array.size == 2 and "1 kept uids are not 128-bit hex" in caplog.text
