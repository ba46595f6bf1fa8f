"""Face blurring as img2dataset/DataComp do it, plus resizing of the curated subset.

Each box is grown by ``grow`` x its longer side on every side, the image is Gaussian-blurred with
sigma = ``sigma_factor`` x the box's longer side, and the blur is blended in through a mask that is
1 inside the grown box and Gaussian-blurred for a soft edge. Unlike img2dataset, the soft mask is
cut at the grown box: every pixel outside the grown boxes stays bit-identical to the input.
Boxes are ``(x0, y0, x1, y1)`` pixel boxes, ``x1``/``y1`` exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

_NATIVE_MODES = ("L", "RGB", "RGBA")


def grown_boxes(
    boxes: Iterable[Sequence[float]], size: tuple[int, int], grow: float = 0.1
) -> list[Box]:
    """Grow each box by ``grow`` x its longer side on every side and clip it to ``size`` (w, h).

    Coordinates are rounded outwards; boxes left empty after clipping are dropped.
    """
    if grow < 0:
        raise ValueError(f"grow must be >= 0, got {grow}")
    width, height = size
    out: list[Box] = []
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        margin = grow * max(x1 - x0, y1 - y0, 0.0)
        gx0 = max(0, math.floor(x0 - margin))
        gy0 = max(0, math.floor(y0 - margin))
        gx1 = min(width, math.ceil(x1 + margin))
        gy1 = min(height, math.ceil(y1 + margin))
        if gx1 > gx0 and gy1 > gy0:
            out.append((gx0, gy0, gx1, gy1))
    return out


def _kernel(sigma: float) -> tuple[int, int]:
    """Odd Gaussian kernel covering +-4 sigma (as albumentations, used by img2dataset)."""
    radius = max(1, math.ceil(4 * sigma))
    return radius, 2 * radius + 1


def blur_faces(
    image: Image.Image,
    boxes: Iterable[Sequence[float]],
    grow: float = 0.1,
    sigma_factor: float = 0.1,
) -> Image.Image:
    """Return a copy of ``image`` with every box Gaussian-blurred through a soft mask.

    Pixels outside the grown boxes are unchanged. Modes other than L/RGB/RGBA are converted to RGB.
    """
    if sigma_factor <= 0:
        raise ValueError(f"sigma_factor must be > 0, got {sigma_factor}")
    boxes = [tuple(float(v) for v in box) for box in boxes]
    if image.mode not in _NATIVE_MODES:
        image = image.convert("RGB")
    grown = [(box, grown_boxes([box], image.size, grow)) for box in boxes]
    grown = [(box, g[0]) for box, g in grown if g]
    if not grown:
        return image.copy()
    src = np.asarray(image)
    out = src.astype(np.float32)
    height, width = src.shape[:2]
    for (x0, y0, x1, y1), (gx0, gy0, gx1, gy1) in grown:
        side = max(x1 - x0, y1 - y0)
        sigma = sigma_factor * side
        radius, ksize = _kernel(sigma)
        # Context of one kernel radius around the grown box, so the blur inside it equals a
        # whole-image blur; at the image border both reflect the same way.
        cx0, cy0 = max(0, gx0 - radius), max(0, gy0 - radius)
        cx1, cy1 = min(width, gx1 + radius), min(height, gy1 + radius)
        patch = out[cy0:cy1, cx0:cx1]
        blurred = cv2.GaussianBlur(patch, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT_101)
        mask = np.zeros(patch.shape[:2], dtype=np.float32)
        inner = (slice(gy0 - cy0, gy1 - cy0), slice(gx0 - cx0, gx1 - cx0))
        mask[inner] = 1.0
        mask = cv2.GaussianBlur(mask, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT_101)
        m = mask[inner]
        if patch.ndim == 3:
            m = m[..., None]
        region = patch[inner]
        out[gy0:gy1, gx0:gx1] = region * (1.0 - m) + blurred[inner] * m
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(result)


def resize_shorter_side(
    image: Image.Image, size: int, only_if_bigger: bool = False
) -> Image.Image:
    """Resize so the shorter side is ``size`` px (bicubic, antialiased), keeping the aspect ratio.

    With ``only_if_bigger`` an image whose shorter side is already <= ``size`` is returned as is.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    width, height = image.size
    shorter = min(width, height)
    if shorter == size or (only_if_bigger and shorter <= size):
        return image.copy()
    scale = size / shorter
    new = (size, max(1, round(height * scale))) if width <= height else (
        max(1, round(width * scale)), size)
    return image.resize(new, Image.Resampling.BICUBIC, reducing_gap=None)


def scale_boxes(
    boxes: Iterable[Sequence[float]], from_size: tuple[int, int], to_size: tuple[int, int]
) -> list[Box]:
    """Map boxes from an image of ``from_size`` (w, h) to the same image resized to ``to_size``.

    Coordinates are rounded outwards and clipped; boxes left empty are dropped.
    """
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    out: list[Box] = []
    for x0, y0, x1, y1 in boxes:
        bx0 = max(0, math.floor(x0 * sx + 1e-6))
        by0 = max(0, math.floor(y0 * sy + 1e-6))
        bx1 = min(to_size[0], math.ceil(x1 * sx - 1e-6))
        by1 = min(to_size[1], math.ceil(y1 * sy - 1e-6))
        if bx1 > bx0 and by1 > by0:
            out.append((bx0, by0, bx1, by1))
    return out


def blur_and_resize(
    image: Image.Image,
    boxes: Iterable[Sequence[float]],
    shorter_side: int,
    grow: float = 0.1,
    sigma_factor: float = 0.1,
    only_if_bigger: bool = False,
) -> tuple[Image.Image, list[Box]]:
    """Blur the faces at full resolution, then resize; return the image and its face boxes.

    The returned boxes are the input boxes (not grown) in the resized image's coordinates.
    """
    boxes = list(boxes)
    blurred = blur_faces(image, boxes, grow=grow, sigma_factor=sigma_factor)
    resized = resize_shorter_side(blurred, shorter_side, only_if_bigger=only_if_bigger)
    return resized, scale_boxes(boxes, blurred.size, resized.size)
