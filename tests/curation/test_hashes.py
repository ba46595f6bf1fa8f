"""The index's hashes equal their reference formulas bit for bit (dedup's figures rest on
them); the opt-in fast crop hashes stay within a few bits of the exact ones."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import scipy.fft
from PIL import Image

from aim_kedro.curation.hashes import (
    color_grid,
    crop_boxes,
    crop_hashes,
    perceptual_hash,
    phashes,
    pixel_sha256,
)
from aim_kedro.curation.index import IndexConfig, image_hashes
from aim_kedro.io.decode import decode_image


def _reference_phash(image: Image.Image) -> int:
    """The pHash as the index first defined it: one image, one DCT."""
    grey = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    dct = scipy.fft.dct(scipy.fft.dct(np.asarray(grey, dtype=np.float64), axis=0), axis=1)
    low = dct[:8, :8]
    return int.from_bytes(np.packbits((low > np.median(low)).ravel()).tobytes(), "big")


def _rescaled_crop_phashes(image: Image.Image, fractions: list[float]) -> list[int]:
    """Crop hashes as first defined: each crop scaled back to full size (bicubic), then pHashed."""
    return [_reference_phash(image.crop(box).resize(image.size, Image.Resampling.BICUBIC))
            for box in crop_boxes(image.size, fractions)]


def _jpeg_photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    noise = rng.integers(-20, 21, (size[1], size[0], 3))
    arr = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.int64) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return decode_image(buffer.getvalue())


@pytest.mark.parametrize("size", [(64, 64), (256, 256), (173, 97), (7, 300)])
def test_phash_grid_and_sha_equal_their_reference_formulas(size) -> None:
    for seed in range(4):
        image = _jpeg_photo(seed, size)
        assert perceptual_hash(image) == _reference_phash(image)
        assert phashes(image, (0.05, 0.1))[0] == _reference_phash(image)  # batched DCT, same bits
        small = image.resize((4, 4), Image.Resampling.BOX)
        assert color_grid(image, 4) == np.asarray(small, dtype=np.uint8).tobytes()
        digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
        digest.update(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes())
        assert pixel_sha256(image) == digest.hexdigest()
    grey = _jpeg_photo(9, (64, 48)).convert("L")
    assert perceptual_hash(grey) == _reference_phash(grey)
    assert pixel_sha256(grey) == pixel_sha256(grey.convert("RGB"))


def test_crop_hashes_equal_the_rescaled_crops_and_the_fast_ones_stay_close() -> None:
    fractions = [0.05, 0.1]
    distances = []
    for seed, size in enumerate([(128, 96), (64, 64), (97, 173)] * 2):
        image = _jpeg_photo(seed, size)
        exact = crop_hashes(image, fractions)
        assert exact == _rescaled_crop_phashes(image, fractions) == phashes(image, fractions)[1]
        fast = crop_hashes(image, fractions, fast=True)
        assert len(fast) == 10 and fast == phashes(image, fractions, fast=True)[1]
        distances += [bin(a ^ b).count("1") for a, b in zip(fast, exact, strict=True)]
    assert max(distances) <= 6 and np.mean(distances) <= 1.5


def test_image_hashes_is_what_the_index_stores() -> None:
    cfg = IndexConfig(crop_fractions=(0.1,), color_grid_size=2)
    image = _jpeg_photo(3, (80, 60))
    fast = image_hashes(image, IndexConfig(crop_fractions=(0.1,), fast_crop_hashes=True))
    assert fast["phash_crops"] == crop_hashes(image, [0.1], fast=True)
    with pytest.raises(ValueError, match="fast_crop_hashes"):
        IndexConfig(fast_crop_hashes="yes")
    assert image_hashes(image, cfg) == {
        "sha256_pixels": pixel_sha256(image),
        "phash": perceptual_hash(image),
        "phash_crops": crop_hashes(image, [0.1]),
        "color_grid": color_grid(image, 2),
    }
    assert crop_boxes((100, 50), [0.1])[1] == (10, 0, 100, 45)
