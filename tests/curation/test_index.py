"""The per-sample pool index: hashes, captions, reasons, duplicate uids."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from aim_kedro.curation.index import (
    INDEX_SCHEMA,
    IndexConfig,
    build_index,
    crop_hashes,
    decode_selected,
    mark_duplicate_uids,
    perceptual_hash,
    pixel_sha256,
)
from aim_kedro.io.decode import decode_image
from aim_kedro.io.shards import ShardSet, write_shards
from aim_kedro.io.uids import default_uid


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int = 0, size: int = 64) -> Image.Image:
    """A smooth random picture: pHash-stable under resizing and re-encoding."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def test_perceptual_hash_is_robust_and_discriminative() -> None:
    a, b = _photo(0), _photo(1)
    ha = perceptual_hash(a)
    assert 0 <= ha < 2**64
    assert _hamming(ha, perceptual_hash(a.resize((96, 96)))) <= 4
    assert _hamming(ha, perceptual_hash(decode_image(_encode(a, "JPEG", quality=50)))) <= 4
    assert _hamming(ha, perceptual_hash(b)) > 12


def test_crop_hashes_catch_a_cropped_copy() -> None:
    image = _photo(3)
    cropped = image.crop((5, 5, 64, 64)).resize((64, 64), Image.Resampling.BICUBIC)
    assert len(crop_hashes(image, [0.05, 0.1])) == 10 and crop_hashes(image, []) == []
    best = min(_hamming(h, perceptual_hash(cropped)) for h in crop_hashes(image, [0.075]))
    assert best <= 6


def test_pixel_hash_ignores_encoding() -> None:
    image = _photo(2)
    png = decode_image(_encode(image, "PNG"))
    bmp = decode_image(_encode(image, "BMP"))
    assert pixel_sha256(png) == pixel_sha256(bmp)
    assert pixel_sha256(png) != pixel_sha256(_photo(4))


def _pool(tmp_path: Path) -> ShardSet:
    good = _encode(_photo(0), "JPEG")
    samples = [
        {"__key__": "a", "jpg": good, "txt": "a red thing", "json": {"uid": "u-a"}},
        {"__key__": "b", "png": _encode(_photo(1), "PNG"), "txt": "  spaced   words "},
        {"__key__": "c", "jpg": good[: len(good) // 2], "txt": "cut", "json": {"uid": "u-c"}},
        {"__key__": "d", "jpg": good, "txt": b"\xff\xfe bad", "json": {"uid": "u-d"}},
        {"__key__": "e", "txt": "no picture", "json": {"uid": "u-e"}},
        {"__key__": "f", "jpg": good, "txt": "x" * 50, "json": {"uid": "u-f"}},
        {"__key__": "g", "jpg": b"", "txt": "empty", "json": {"uid": "u-g"}},
    ]
    write_shards(samples[:4], str(tmp_path / "pool"), samples_per_shard=4, prefix="s0")
    write_shards(samples[4:], str(tmp_path / "pool"), samples_per_shard=4, prefix="s1")
    return ShardSet.open(str(tmp_path / "pool"))


def test_build_index_records_every_sample_and_why(tmp_path: Path) -> None:
    cfg = IndexConfig(max_caption_chars=10, max_image_pixels=10_000)
    before = Image.MAX_IMAGE_PIXELS
    index, summary = build_index(_pool(tmp_path), cfg, progress=False)
    assert Image.MAX_IMAGE_PIXELS == before
    assert index.schema == pl.Schema(INDEX_SCHEMA)
    assert index.height == 7 and summary["samples"] == 7 and summary["shards"] == 2
    rows = {r["key"]: r for r in index.iter_rows(named=True)}
    assert rows["a"]["reject_reason"] is None and rows["a"]["uid"] == "u-a"
    assert rows["a"]["width"] == 64 and rows["a"]["phash"] is not None
    assert len(rows["a"]["phash_crops"]) == 10 and len(rows["a"]["color_grid"]) == 48
    assert rows["b"]["uid"] == default_uid("s0-000000.tar", "b") and len(rows["b"]["uid"]) == 32
    assert rows["b"]["caption"] == "spaced wor"  # whitespace folded, capped at 10 chars
    assert rows["c"]["reject_reason"] == "corrupt"
    assert rows["c"]["reject_detail"].startswith("truncated jpeg")
    assert rows["d"]["reject_reason"] == "no_caption" and "UTF-8" in rows["d"]["reject_detail"]
    assert rows["e"]["reject_detail"] == "no image member"
    assert rows["g"]["reject_detail"] == "zero-byte image"
    assert rows["a"]["sha256_bytes"] == rows["f"]["sha256_bytes"]
    assert summary["rejected"] == {"corrupt": 3, "no_caption": 1}
    again, _ = build_index(_pool(tmp_path / "again"), cfg, progress=False)
    assert again["uid"].to_list() == index["uid"].to_list()


def test_damaged_shards_do_not_stop_the_index(tmp_path: Path) -> None:
    good = _encode(_photo(0), "PNG")
    folder = tmp_path / "pool"
    folder.mkdir()
    with tarfile.open(folder / "s-000000.tar", "w") as tar:
        for name, data in [("k.png", good), ("k.txt", b"one"), ("k.json", b"{}"),
                           ("x.png", good), ("x.txt", b"two"), ("k.txt", b"again")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = _encode(_photo(5), "PNG") * 40
    write_shards(
        [{"__key__": f"t{i}", "png": whole, "txt": "fine", "json": json.dumps({"uid": f"t{i}"})}
         for i in range(3)],
        str(folder), prefix="t",
    )
    truncated = folder / "t-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[: len(whole) + 3000])
    index, _ = build_index(ShardSet.open(str(folder)), IndexConfig(), progress=False)
    details = index["reject_detail"].to_list()
    assert "duplicate key in shard" in details
    assert any(d and d.startswith("truncated tar") for d in details)
    assert index.filter(pl.col("key") == "x")["reject_reason"].item() is None
    assert index["uid"].n_unique() == index.height


def test_repeated_uids_are_rejected_and_renamed() -> None:
    table = pl.DataFrame(
        {"uid": ["a", "b", "a"], "shard": ["s"] * 3, "key": ["1", "2", "3"], "position": [0, 1, 2],
         "reject_reason": [None, None, None], "reject_detail": [None, None, None]},
        schema_overrides={"reject_reason": pl.String, "reject_detail": pl.String},
    )
    out = mark_duplicate_uids(table)
    assert out["uid"].n_unique() == 3 and out["uid"][0] == "a"
    assert out["reject_reason"].to_list() == [None, None, "duplicate_uid"]
    assert out["reject_detail"][2] == "duplicate uid a"


def test_decode_selected_streams_chosen_rows_and_checks_keys(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    index, _ = build_index(pool, IndexConfig(), progress=False)
    chosen = index.filter(pl.col("key").is_in(["b", "f"]))
    got = list(decode_selected(pool, chosen, IndexConfig()))
    assert [row["key"] for row, _ in got] == ["b", "f"]
    assert all(image is not None and image.mode == "RGB" for _, image in got)
    wrong = chosen.with_columns(pl.lit("zzz").alias("key"))
    with pytest.raises(ValueError, match="re-run build_pool_index"):
        list(decode_selected(pool, wrong, IndexConfig()))


def test_index_holds_one_shard_at_a_time(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    open_now = {"count": 0, "max": 0}

    class Tracking(ShardSet):
        def iter_shard(self, shard: str):
            open_now["count"] += 1
            open_now["max"] = max(open_now["max"], open_now["count"])
            yield from super().iter_shard(shard)
            open_now["count"] -= 1

    build_index(Tracking(path=pool.path, shards=pool.shards), IndexConfig(), progress=False)
    assert open_now["max"] == 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="curation.index.max_image_pixels"):
        IndexConfig(max_image_pixels=0)
    with pytest.raises(ValueError, match="curation.index.crop_fractions"):
        IndexConfig(crop_fractions=[0.05, 0.6])
    assert IndexConfig(crop_fractions=[0.05]).crop_fractions == (0.05,)
