"""Reduced-scale JPEG decoding (``decode_image(min_side=...)``): the smallest DCT scale that
keeps both sides >= min_side, the same picture, full size for other formats."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aim_kedro.io.decode import decode_image


def _smooth(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def _bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("size,min_side,expected", [
    ((256, 256), 64, (64, 64)),      # 1/4
    ((256, 256), 100, (128, 128)),   # 1/2: 1/4 would be 64 < 100
    ((256, 256), 32, (32, 32)),      # 1/8, the smallest scale
    ((256, 256), 16, (32, 32)),
    ((300, 200), 64, (150, 100)),    # the shorter side decides
    ((64, 64), 64, (64, 64)),        # no smaller scale keeps 64: full size
    ((256, 256), None, (256, 256)),
])
def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_min_side(size, min_side, expected) -> None:
    data = _bytes(_smooth(size), "JPEG", quality=95)
    image = decode_image(data, min_side=min_side)
    assert image.size == expected and image.mode == "RGB"
    full = decode_image(data).resize(expected, Image.Resampling.BOX)
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(full, dtype=np.int16)).mean() < 4


def test_other_formats_and_rotations() -> None:
    assert decode_image(_bytes(_smooth((256, 256)), "PNG"), min_side=32).size == (256, 256)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the upright image is 100 x 300
    rotated = decode_image(_bytes(_smooth((300, 100)), "JPEG", exif=exif.tobytes()), min_side=40)
    assert rotated.size == (50, 150)
    truncated = _bytes(_smooth((256, 256)), "JPEG")[:-200]
    with pytest.raises(Exception, match="truncated|corrupt"):
        decode_image(truncated, min_side=64)
