"""Uniform borders (letterbox bars, padding, plain frames) found and cut, so that a padded or
letterboxed copy is described and verified as the picture inside it (``copydetect``, ``verify``)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def border_box(
    image: Image.Image, tolerance: int = 12, uniform: float = 0.97, max_fraction: float = 0.45
) -> tuple[int, int, int, int]:
    """The box ``(left, top, right, bottom)`` inside the uniform borders of ``image``
    (letterbox bars, padding, a plain frame): on each side, the lines in which at least
    ``uniform`` of the pixels are within ``tolerance`` (0-255, any channel) of that side's
    outermost line's median colour, up to ``max_fraction`` of the size. The whole image when
    nothing is trimmed or too little would remain."""
    arr = np.asarray(image.convert("RGB"))
    height, width = arr.shape[:2]

    def depth(lines: np.ndarray) -> int:
        colour = np.median(lines[0], axis=0)
        done = 0
        for step in (1, 7, 24, len(lines)):  # most pictures stop at their first line
            block = lines[done : done + step].astype(np.int16)
            if not len(block):
                break
            close = (np.abs(block - colour).max(axis=-1) <= tolerance).mean(axis=-1) >= uniform
            if not close.all():
                return done + int(np.argmin(close))
            done += len(block)
        return done

    rows, cols = max(1, int(height * max_fraction)), max(1, int(width * max_fraction))
    top = depth(arr[:rows])
    bottom = depth(arr[::-1][:rows])
    left = depth(arr[:, :cols].transpose(1, 0, 2))
    right = depth(arr[:, ::-1][:, :cols].transpose(1, 0, 2))
    box = (left, top, width - right, height - bottom)
    if box[2] - box[0] < max(4, width // 8) or box[3] - box[1] < max(4, height // 8):
        return 0, 0, width, height
    return box


def trim_borders(image: Image.Image, passes: int = 3) -> Image.Image:
    """``image`` cropped to its ``border_box``, again while that removes more (a coloured pad
    around a picture with white margins takes two passes); itself without uniform borders."""
    for _ in range(passes):
        box = border_box(image)
        if box == (0, 0, *image.size):
            break
        image = image.crop(box)
    return image


__all__ = ["border_box", "trim_borders"]
