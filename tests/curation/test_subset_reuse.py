"""The subset writer reuses a source file that needs neither blur nor resize (same pixels, no
re-encode) and writes everything else exactly as before (blur, resize, encode)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aim_kedro.curation.blur import blur_and_resize
from aim_kedro.curation.subset import (
    SubsetConfig,
    encode_image,
    reusable_bytes,
    same_size,
    subset_sample,
)
from aim_kedro.io.decode import decode_image

ROW = {"uid": "u1", "caption": "a picture", "clip_score": 0.5, "nsfw_score": 0.1,
       "dedup_cluster": None, "shard": "pool-000000.tar", "key": "k1", "url": None}


def _picture(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_reusable_bytes_only_for_plain_files_of_the_subset_format() -> None:
    png = _encode(_picture((32, 40)), "PNG")
    assert reusable_bytes(("png", png), "png") == png
    grey = _encode(_picture((32, 40), "L"), "PNG")
    assert reusable_bytes(("png", grey), "png") == grey
    assert reusable_bytes(("png", png), "jpg") is None  # another format: re-encoded
    assert reusable_bytes(("png", _encode(_picture((32, 40), "RGBA"), "PNG")), "png") is None
    rotated = _picture((32, 40)).getexif()
    rotated[0x0112] = 6
    jpeg = _encode(_picture((32, 40)), "JPEG", exif=rotated.tobytes())
    assert reusable_bytes(("jpg", jpeg), "jpg") is None  # EXIF rotation: decoded pixels differ
    assert reusable_bytes(("jpg", _encode(_picture((32, 40)), "JPEG")), "jpg") is not None
    assert reusable_bytes(("png", b"broken"), "png") is None
    assert reusable_bytes(None, "png") is None


def test_same_size_follows_the_resize_rule() -> None:
    cfg = SubsetConfig(shorter_side=32)
    assert same_size((32, 40), cfg) and not same_size((48, 40), cfg)
    assert not same_size((24, 40), cfg)
    assert same_size((24, 40), SubsetConfig(shorter_side=32, only_if_bigger=True))


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_an_unchanged_image_is_written_as_its_source_bytes(fmt, ext) -> None:
    cfg = SubsetConfig(shorter_side=32, image_format=ext)
    data = _encode(_picture((32, 40)), fmt)
    image = decode_image(data)
    sample = subset_sample(ROW, image, [], cfg, (ext, data))
    assert sample[ext] == data
    assert np.array_equal(np.asarray(decode_image(sample[ext])), np.asarray(image))
    assert (sample["json"]["width"], sample["json"]["height"]) == (32, 40)
    assert sample["json"]["face_boxes"] == [] and sample["json"]["face_count"] == 0


def test_blurred_resized_or_converted_images_are_encoded_as_before() -> None:
    cfg = SubsetConfig(shorter_side=32, image_format="png")
    for size, boxes, source_fmt in [((32, 40), [(2, 2, 12, 12)], "PNG"),  # a face: blurred
                                    ((64, 80), [], "PNG"),  # resized
                                    ((32, 40), [], "JPEG")]:  # another format
        data = _encode(_picture(size), source_fmt)
        image = decode_image(data)
        out, out_boxes = blur_and_resize(image, boxes, cfg.shorter_side, grow=cfg.blur_grow,
                                         sigma_factor=cfg.blur_sigma_factor)
        sample = subset_sample(ROW, image, boxes, cfg, ("png", data))
        assert sample["png"] == encode_image(out, "png", cfg.quality) != data
        assert sample["json"]["face_boxes"] == [list(b) for b in out_boxes]
        assert subset_sample(ROW, image, boxes, cfg)["png"] == sample["png"]
