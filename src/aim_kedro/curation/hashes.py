"""The per-image hashes dedup and the eval-leak check compare: pHash, crop pHashes, colour
grid, pixel sha256. Each works on one decoded RGB image; ``phashes`` computes the pHash and the
crop hashes from one greyscale copy and one batched DCT, the cost the index pays per sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import scipy.fft
from PIL import Image

PHASH_SIZE = 8
"""The pHash is the sign pattern of the low 8x8 DCT block (64 bits)..."""
PHASH_INPUT = 32
"""... of a 32x32 greyscale copy (8 x the highfreq factor 4)."""


def _dct_hashes(stack: np.ndarray) -> list[int]:
    """64-bit pHashes of a ``[K, 32, 32]`` stack of greyscale copies, in one batched DCT: each
    low 8x8 block compared with its own median."""
    dct = scipy.fft.dct(scipy.fft.dct(stack, axis=1), axis=2)
    low = dct[:, :PHASH_SIZE, :PHASH_SIZE].reshape(len(stack), PHASH_SIZE * PHASH_SIZE)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [int.from_bytes(row.tobytes(), "big") for row in np.packbits(bits, axis=1)]


def _small(grey: Image.Image, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    small = grey.resize((PHASH_INPUT, PHASH_INPUT), Image.Resampling.LANCZOS, box=box)
    return np.asarray(small, dtype=np.float64)


def crop_boxes(size: tuple[int, int], fractions: Iterable[float]) -> list[tuple[int, int, int, int]]:
    """The crops of ``crop_hashes``: per fraction the four corners and the centre, each cutting
    ``fraction`` of the width and height (pixel boxes, rounded as ``Image.crop`` rounds)."""
    width, height = size
    boxes = []
    for fraction in fractions:
        cut_w, cut_h = fraction * width, fraction * height
        keep_w, keep_h = width - cut_w, height - cut_h
        for x, y in ((0, 0), (cut_w, 0), (0, cut_h), (cut_w, cut_h), (cut_w / 2, cut_h / 2)):
            boxes.append((round(x), round(y), round(x + keep_w), round(y + keep_h)))
    return boxes


def phashes(
    image: Image.Image, fractions: Iterable[float] = (), fast: bool = False
) -> tuple[int, list[int]]:
    """The pHash of ``image`` and its crop hashes (``crop_hashes``), with one batched DCT.

    By default each crop is scaled back to the full size (bicubic) before it is hashed, the
    index's definition; ``fast`` resamples the crop box of one greyscale copy straight to the
    32x32 input instead (about 4x cheaper at 256 px; hashes a few bits apart, so dedup
    decisions at the radius can move: ``curation.index.fast_crop_hashes``).
    """
    grey = image.convert("L")
    boxes = crop_boxes(image.size, fractions)
    if fast:
        crops = [_small(grey, box) for box in boxes]
    else:
        crops = [_small(image.crop(box).resize(image.size, Image.Resampling.BICUBIC).convert("L"))
                 for box in boxes]
    hashes = _dct_hashes(np.stack([_small(grey), *crops]))
    return hashes[0], hashes[1:]


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: DCT of a 32x32 greyscale copy (Lanczos), low 8x8 block vs its median."""
    return phashes(image)[0]


def crop_hashes(image: Image.Image, fractions: Iterable[float], fast: bool = False) -> list[int]:
    """pHashes of crops that cut each ``fraction`` of the width and height: the four corner
    crops and the centre crop per fraction, each scaled back to the full size (``fast``: see
    ``phashes``).

    A copy cropped by a few percent and scaled back hashes close to one of these, while its
    full-image pHash can be far from the original's.
    """
    return phashes(image, fractions, fast)[1]


def color_grid(image: Image.Image, size: int = 4) -> bytes:
    """Mean colour of each cell of a ``size`` x ``size`` grid, as ``size*size*3`` bytes.

    A near copy keeps its colours where a different picture with the same shapes does not, so
    this separates pHash matches that are true copies from look-alikes.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((size, size), Image.Resampling.BOX).tobytes()


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (with the size), equal for lossless re-encodes."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


__all__ = [
    "PHASH_INPUT",
    "PHASH_SIZE",
    "color_grid",
    "crop_boxes",
    "crop_hashes",
    "perceptual_hash",
    "phashes",
    "pixel_sha256",
]
