"""The shard reader survives damaged tars and duplicate keys, and never loses a record."""

import io
import tarfile
from pathlib import Path

from aim_kedro.io.shards import (
    ERROR_KEY,
    read_shard,
    sample_json,
    sample_text,
    write_shards,
)


def test_write_shards_splits_by_count(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i}", "txt": str(i)} for i in range(25)]
    paths = write_shards(samples, str(tmp_path), samples_per_shard=10)
    assert [Path(p).name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["txt"] for p in paths for s in read_shard(p)] == [str(i).encode() for i in range(25)]


def test_truncated_tar_yields_what_it_can_then_an_error(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i}", "txt": "x" * 2000} for i in range(10)]
    (path,) = write_shards(samples, str(tmp_path), samples_per_shard=100)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    out = list(read_shard(path))
    assert out[-1][ERROR_KEY].startswith("truncated_tar")
    good = [s for s in out if ERROR_KEY not in s]
    assert 2 <= len(good) < 10


def test_duplicate_keys_in_one_tar_are_flagged(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in [("a.txt", b"1"), ("b.txt", b"2"), ("a.txt", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = list(read_shard(str(path)))
    assert [s["__key__"] for s in out] == ["a", "b", "a"]
    assert ERROR_KEY not in out[0] and out[2][ERROR_KEY] == "duplicate_key"


def test_text_and_json_helpers_reject_bad_bytes() -> None:
    assert sample_text({"txt": b"\xff\xfe bad"}) is None
    assert sample_text({"txt": b"ok"}) == "ok"
    assert sample_json({"json": b"{not json"}) == {}
    assert sample_json({"json": b'{"uid": "ab"}'}) == {"uid": "ab"}


def test_image_text_pairs_skip_damaged_and_imageless_samples() -> None:
    from aim_kedro.io.shards import image_text_pairs

    samples = [
        {"__key__": "a", "png": b"png-bytes", "txt": b"a caption"},
        {"__key__": "b", "jpg": b"jpg-bytes"},
        {"__key__": "c", "txt": b"no image"},
        {"__key__": "d", ERROR_KEY: "truncated", "png": b"x"},
    ]
    assert list(image_text_pairs(samples)) == [(b"png-bytes", "a caption"), (b"jpg-bytes", "")]
