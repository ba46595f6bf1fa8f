"""The one image decoder: reasons for bad bytes, the bomb guard, every mode to RGB, EXIF."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from aim_kedro.io.decode import DecodeError, decode_image, decode_or_none


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int = 0, size: int = 64) -> Image.Image:
    """A smooth random picture: pHash-stable under resizing and re-encoding."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    ihdr = struct.pack(">II", width, height) + png[24:29]
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return png[:8] + chunk + png[33:]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "zero-byte image"),
        (b"definitely not an image", "cannot identify image"),
        (_png_claiming(30_000, 30_000), "decompression bomb 900000000 px"),
    ],
)
def test_decode_rejects_bad_bytes_with_a_reason(data: bytes, expected: str) -> None:
    with pytest.raises(DecodeError, match=expected):
        decode_image(data, max_pixels=1_000_000)


def test_truncated_jpeg_is_named() -> None:
    data = _encode(_photo(), "JPEG")
    with pytest.raises(DecodeError, match="^truncated jpeg"):
        decode_image(data[: len(data) // 2])


def test_bomb_limit_is_a_parameter_and_pillow_limit_is_restored() -> None:
    before = Image.MAX_IMAGE_PIXELS
    bomb = _png_claiming(300, 300)
    with pytest.raises(DecodeError, match="decompression bomb 90000 px"):
        decode_image(bomb, max_pixels=50_000)
    with pytest.raises(DecodeError, match="truncated png"):
        decode_image(bomb, max_pixels=100_000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_every_mode_becomes_rgb() -> None:
    wide = Image.fromarray(np.array([[0, 65535], [32768, 1000]], dtype=np.uint16))
    rgb = decode_image(_encode(wide, "PNG"))
    assert rgb.mode == "RGB" and rgb.getpixel((1, 0)) == (255, 255, 255)
    assert rgb.getpixel((0, 1))[0] == 128  # scaled, not clipped to 255

    cmyk = decode_image(_encode(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[1] < 30

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert decode_image(_encode(palette, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(_encode(Image.new("LA", (4, 4), (0, 0)), "PNG")).getpixel((0, 0)) == (
        255, 255, 255,
    )
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (20, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    assert decode_image(_encode(image, "JPEG", exif=exif.tobytes())).size == (10, 20)


def test_decode_or_none_skips_what_cannot_be_used() -> None:
    assert decode_or_none(None) is None and decode_or_none(b"garbage") is None
    assert decode_or_none(_encode(_photo(), "PNG")).size == (64, 64)
    assert decode_or_none(Image.new("L", (3, 5))).mode == "RGB"


def _garbage_scan(data: bytes, start_fraction: float, seed: int = 1) -> bytes:
    """The JPEG with its entropy-coded data from ``start_fraction`` on replaced by random bytes
    (no 0xFF, so no marker appears): a valid header Pillow decodes to noise."""
    sos = data.index(b"\xff\xda")
    begin = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    cut = begin + int((end - begin) * start_fraction)
    noise = np.random.default_rng(seed).integers(0, 255, end - cut, dtype=np.uint8).tobytes()
    return data[:cut] + noise + data[end:]


@pytest.mark.parametrize("start_fraction", [0.0, 0.5])
def test_a_jpeg_with_garbage_scan_data_is_rejected_not_decoded_to_noise(start_fraction: float) -> None:
    bad = _garbage_scan(_encode(_photo(3, 96), "JPEG", quality=90), start_fraction)
    Image.open(io.BytesIO(bad)).load()  # Pillow alone takes it (the fault this guards against)
    with pytest.raises(DecodeError, match="corrupt jpeg: .*(Corrupt JPEG data|Premature end)"):
        decode_image(bad)
    assert decode_image(bad, strict=False).size == (96, 96)


def test_strict_decoding_keeps_every_kind_of_good_jpeg() -> None:
    photo = _photo(5, 80)
    for image, options in [
        (photo, {"quality": 95}),
        (photo, {"quality": 40, "progressive": True}),
        (photo.convert("L"), {}),
        (photo.convert("CMYK"), {}),
        (photo, {"subsampling": 0}),
    ]:
        assert decode_image(_encode(image, "JPEG", **options)).size == (80, 80)


def test_truncated_images_stay_errors_when_another_library_allows_them() -> None:
    from PIL import ImageFile

    data = _encode(_photo(2, 64), "JPEG")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(DecodeError, match="truncated"):
            decode_image(data[: len(data) // 2])
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
