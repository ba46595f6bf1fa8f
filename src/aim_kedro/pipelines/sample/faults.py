"""The planted faults of the sample pool: near copies and wrong captions, made reproducibly."""

from __future__ import annotations

import numpy as np
from PIL import Image

from aim_kedro.pipelines.sample.sources import (
    PHOTO_SOURCES,
    Rendered,
    digit_caption,
    encode,
    photo_caption,
)


def near_duplicate(image: Image.Image, variant: str, rng: np.random.Generator) -> bytes:
    """A near copy: resized, cropped by 5-10%, JPEG-recompressed, or slightly colour-shifted."""
    size = image.width
    if variant == "resized":
        new = int(size * rng.choice([0.75, 0.875, 1.25, 1.5]))
        return encode(image.resize((new, new), Image.Resampling.BICUBIC), "jpg", 90)
    if variant == "cropped":
        cut = rng.uniform(0.05, 0.10)
        left, top = (int(v) for v in rng.integers(0, int(size * cut) + 1, size=2))
        right = size - (int(size * cut) - left)
        bottom = size - (int(size * cut) - top)
        return encode(image.crop((left, top, right, bottom)).resize((size, size), Image.Resampling.BICUBIC))
    if variant == "jpeg":
        return encode(image, "jpg", int(rng.integers(30, 60)))
    shift = rng.uniform(-12, 12, size=3)
    gain = rng.uniform(0.95, 1.05)
    shifted = np.clip(np.asarray(image, np.float32) * gain + shift, 0, 255).astype(np.uint8)
    return encode(Image.fromarray(shifted), "jpg", 90)


def wrong_caption(rendered: Rendered, rng: np.random.Generator) -> str:
    """A caption that belongs to another kind of picture than ``rendered``."""
    if rendered.source == "sklearn_digits":
        if rng.random() < 0.5:
            others = [d for d in range(10) if str(d) != rendered.label]
            return digit_caption(int(rng.choice(others)), rng)
        return photo_caption(PHOTO_SOURCES[rng.choice(list(PHOTO_SOURCES))], rng)
    if rng.random() < 0.5:
        return digit_caption(int(rng.integers(10)), rng)
    others = [n for n in PHOTO_SOURCES if n != rendered.label]
    return photo_caption(PHOTO_SOURCES[rng.choice(others)], rng)
