"""WebDatasetShards: versioned, atomic, lazy, and readable by the webdataset package."""

import io
import json
from pathlib import Path

import pytest
from kedro.io import Version
from PIL import Image

from aim_kedro.datasets import WebDatasetShards
from aim_kedro.io.shards import ShardSet


def _samples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(buf, format="PNG")
        out.append({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": f"caption {i}",
                    "json": {"uid": f"{i:032x}"}})
    return out


def test_save_load_round_trip_and_sharding(tmp_path: Path) -> None:
    ds = WebDatasetShards(filepath=str(tmp_path / "pool"), samples_per_shard=4, version=Version(None, None))
    ds.save(iter(_samples(10)))
    handle = ds.load()
    assert isinstance(handle, ShardSet)
    assert len(handle.shards) == 3
    loaded = list(handle)
    assert [s["__key__"] for s in loaded] == [f"{i:06d}" for i in range(10)]
    assert loaded[3]["txt"] == b"caption 3"
    assert json.loads(loaded[3]["json"]) == {"uid": f"{3:032x}"}


def test_shards_are_read_by_the_webdataset_package(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")  # not a dependency: img2dataset (dev) brings it
    ds = WebDatasetShards(filepath=str(tmp_path / "pool"), samples_per_shard=3, version=Version(None, None))
    ds.save(_samples(7))
    urls = ds.load().shards
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(read) == 7
    assert read[5]["__key__"] == "000005"
    assert read[5]["txt"] == "caption 5"
    assert read[5]["png"].getpixel((0, 0)) == (5, 10, 15)


def test_two_saves_make_two_versions_and_load_takes_latest(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    # explicit save versions: Kedro's timestamps can repeat within a millisecond
    WebDatasetShards(filepath=str(path), version=Version(None, "2026-01-01T00.00.00.000Z")).save(_samples(2))
    WebDatasetShards(filepath=str(path), version=Version(None, "2026-01-01T00.00.00.001Z")).save(_samples(5))
    versions = sorted(p.name for p in path.iterdir())
    assert len(versions) == 2
    latest = WebDatasetShards(filepath=str(path), version=Version(None, None)).load()
    assert latest.count() == 5
    first = WebDatasetShards(filepath=str(path), version=Version(versions[0], None)).load()
    assert first.count() == 2


def test_a_save_that_fails_half_way_leaves_no_version(tmp_path: Path) -> None:
    path = tmp_path / "pool"

    def broken():
        yield from _samples(3)
        raise RuntimeError("killed mid-write")

    ds = WebDatasetShards(filepath=str(path), samples_per_shard=1, version=Version(None, None))
    with pytest.raises(Exception, match="killed mid-write"):
        ds.save(broken())
    assert not path.exists() or not any(path.iterdir())
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert not WebDatasetShards(filepath=str(path), version=Version(None, None)).exists()


def test_preview_lists_first_rows(tmp_path: Path) -> None:
    ds = WebDatasetShards(filepath=str(tmp_path / "pool"), version=Version(None, None))
    ds.save(_samples(12))
    preview = ds.preview(nrows=5)
    assert preview["columns"][:4] == ["key", "shard", "uid", "caption"]
    assert len(preview["data"]) == 5
    assert preview["data"][1][2] == f"{1:032x}"
    assert preview["data"][1][3] == "caption 1"


def test_no_version_is_visible_while_a_save_is_in_flight(tmp_path: Path) -> None:
    path = str(tmp_path / "pool")
    seen_mid_save = []

    def slow():
        for i, sample in enumerate(_samples(6)):
            if i == 4:
                seen_mid_save.append(WebDatasetShards(filepath=path, version=Version(None, None)).exists())
            yield sample

    WebDatasetShards(filepath=path, samples_per_shard=2, version=Version(None, None)).save(slow())
    assert seen_mid_save == [False]
    assert WebDatasetShards(filepath=path, version=Version(None, None)).load().count() == 6


def test_unversioned_save_replaces_the_folder(tmp_path: Path) -> None:
    path = str(tmp_path / "plain")
    WebDatasetShards(filepath=path).save(_samples(3))
    WebDatasetShards(filepath=path).save(_samples(5))
    assert WebDatasetShards(filepath=path).load().count() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


@pytest.mark.parametrize("versioned", [False, True])
def test_missing_ok_loads_an_absent_folder_as_an_empty_set(tmp_path: Path, versioned: bool) -> None:
    version = Version(None, None) if versioned else None
    optional = WebDatasetShards(filepath=str(tmp_path / "pool"), missing_ok=True, version=version)
    assert optional.exists()
    empty = optional.load()
    assert isinstance(empty, ShardSet) and empty.shards == [] and list(empty) == []
    required = WebDatasetShards(filepath=str(tmp_path / "pool"), version=version)
    assert not required.exists()
    optional.save(iter(_samples(3)))
    saved = WebDatasetShards(filepath=str(tmp_path / "pool"), missing_ok=True, version=version)
    assert [s["__key__"] for s in saved.load()] == ["000000", "000001", "000002"]


def test_brace_ranges_lists_and_pipes_are_read_only_specs(tmp_path: Path) -> None:
    for run in ("run1", "run2"):
        WebDatasetShards(filepath=str(tmp_path / "pool" / run), samples_per_shard=2,
                         prefix="part").save(_samples(4))
    braces = WebDatasetShards(filepath=str(tmp_path / "pool" / "run{1,2}" / "part-{000000..000001}.tar"))
    listed = WebDatasetShards(filepath=[str(tmp_path / "pool" / "run1"), str(tmp_path / "pool" / "run2")])
    piped = WebDatasetShards(filepath=f"pipe:cat {tmp_path}/pool/run{{1,2}}/part-{{000000..000001}}.tar")
    for ds in (braces, listed, piped):
        assert ds.exists()
        shards = ds.load()
        assert shards.names == ["run1/part-000000.tar", "run1/part-000001.tar",
                                "run2/part-000000.tar", "run2/part-000001.tar"]
        assert shards.count() == 8
    with pytest.raises(Exception, match="read-only"):
        listed.save(_samples(1))
    with pytest.raises(Exception, match="versioned: false"):
        WebDatasetShards(filepath=[str(tmp_path)], version=Version(None, None))


def test_an_unreachable_remote_pool_fails_exists_with_the_cause() -> None:
    from loopback import closed_port

    pool = WebDatasetShards(filepath=f"http://127.0.0.1:{closed_port()}/pool/")
    with pytest.raises(Exception, match="(?i)connect"):
        pool.exists()


def test_a_pool_served_over_http_loads_with_ids_and_no_doubled_protocol(tmp_path: Path) -> None:
    from loopback import serve

    WebDatasetShards(filepath=str(tmp_path / "pool"), samples_per_shard=3).save(_samples(7))
    with serve(tmp_path) as (url, _):
        pool = WebDatasetShards(filepath=f"{url}/pool")
        assert pool.exists()
        shards = pool.load()
        assert shards.shards[0] == f"{url}/pool/shard-000000.tar"
        assert [s["__key__"] for s in shards] == [f"{i:06d}" for i in range(7)]
        assert not WebDatasetShards(filepath=f"{url}/elsewhere").exists()


def test_uid_list_dataset_round_trips_datacomps_format(tmp_path: Path) -> None:
    import numpy as np

    from aim_kedro.datasets import UidListDataset
    from aim_kedro.io.uids import from_datacomp

    ds = UidListDataset(filepath=str(tmp_path / "dfn_uids.npy"), version=Version(None, None))
    ds.save(["ff" * 16, "0a" * 16])
    loaded = UidListDataset(filepath=str(tmp_path / "dfn_uids.npy"), version=Version(None, None)).load()
    assert loaded.dtype == np.dtype("u8,u8") and from_datacomp(loaded) == ["0a" * 16, "ff" * 16]
    assert np.load(next((tmp_path / "dfn_uids.npy").rglob("*.npy"))).dtype == np.dtype("u8,u8")
    assert ds.preview()["data"] == [["0a" * 16], ["ff" * 16]]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.rglob("*"))
