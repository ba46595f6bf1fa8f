"""Real images that installed packages ship (skimage, sklearn, matplotlib), rendered for the sample.

Nothing here downloads: every picture comes from files inside installed wheels. Digits are
rendered in colour at a random size and place, photos are cut into random crops, and faces
(astronaut, Grace Hopper, LFW crops pasted into scenes) come with their ground-truth boxes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

import matplotlib.cbook
import numpy as np
import skimage.data
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

Box = tuple[int, int, int, int]

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a drawing of the digit {n}",
    "handwritten {word} ({n})",
]
PHOTO_TEMPLATES = ["a photo of {x}", "{x}", "an image showing {x}", "a close-up photo of {x}"]

# name -> (loader, what the picture shows); only pictures without people.
PHOTO_SOURCES: dict[str, str] = {
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket on a launch pad",
    "coins": "old coins",
    "moon": "the surface of the moon",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained tissue under a microscope",
    "retina": "the retina of an eye",
    "brick": "a brick wall",
    "grass": "a lawn of grass",
    "gravel": "gravel stones",
    "stereo_motorcycle": "a motorcycle",
    "colorwheel": "a colour wheel",
    "page": "a page of printed text",
    "cell": "a cell under a microscope",
    "horse": "the silhouette of a horse",
    "clock": "a wall clock",
    "china": "a chinese temple",
    "flower": "a flower",
}

# Face boxes (x0, y0, x1, y1) in the original pictures' pixels, checked by eye.
FACE_SOURCES: dict[str, tuple[str, Box]] = {
    "astronaut": ("an astronaut in a spacesuit", (168, 52, 282, 176)),
    "grace_hopper": ("a portrait of a woman in a navy uniform", (150, 95, 385, 345)),
}
BACKGROUNDS = ["coffee", "brick", "grass", "gravel", "rocket", "coins", "china", "flower", "retina"]


def _to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array[..., :3]


@cache
def photo(name: str) -> np.ndarray:
    """An RGB uint8 picture by name from skimage.data, sklearn sample images or matplotlib."""
    if name in ("china", "flower"):
        images = load_sample_images()
        index = [i for i, f in enumerate(images.filenames) if name in f][0]
        return _to_rgb(images.images[index])
    if name == "grace_hopper":
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return _to_rgb(np.asarray(Image.open(f).convert("RGB")))
    loaded = getattr(skimage.data, name)()
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    return _to_rgb(np.asarray(loaded))


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 8x8 digits (values 0..16) and their labels."""
    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


@cache
def lfw_faces() -> np.ndarray:
    """The 100 face crops (25x25 grayscale floats in [0, 1]) of skimage's LFW subset."""
    return skimage.data.lfw_subset()[:100]


@dataclass
class Rendered:
    """A rendered picture with its caption and, for faces, its boxes."""

    image: Image.Image
    caption: str
    source: str
    label: str
    face_boxes: list[Box]


def digit_caption(label: int, rng: np.random.Generator) -> str:
    """A true caption for a digit."""
    template = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
    return template.format(word=DIGIT_WORDS[label], n=label)


def photo_caption(subject: str, rng: np.random.Generator) -> str:
    """A true caption for a photo of ``subject``."""
    return PHOTO_TEMPLATES[rng.integers(len(PHOTO_TEMPLATES))].format(x=subject)


def render_digit(index: int, size: int, rng: np.random.Generator, jitter: bool = True) -> Rendered:
    """Digit ``index`` in colour: dark ink on light paper of random hues, light noise; with
    ``jitter`` at a random scale and place (the pool), else centred at 80% (the probe sets)."""
    images, labels = digits()
    glyph = Image.fromarray((images[index] / 16.0 * 255).astype(np.uint8), mode="L")
    side = int(rng.integers(int(size * 0.7), int(size * 0.9) + 1)) if jitter else int(size * 0.8)
    glyph = glyph.resize((side, side), Image.Resampling.BICUBIC)
    alpha = np.asarray(glyph, dtype=np.float32)[..., None] / 255.0
    # Light paper and dark ink of random hues: colourful, but with one polarity, as on paper.
    paper = rng.integers(150, 256, size=3).astype(np.float32)
    ink = rng.integers(0, 110, size=3).astype(np.float32)
    canvas = np.ones((size, size, 3), np.float32) * paper
    if jitter:
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    else:
        x0 = y0 = (size - side) // 2
    patch = canvas[y0 : y0 + side, x0 : x0 + side]
    canvas[y0 : y0 + side, x0 : x0 + side] = patch * (1 - alpha) + ink * alpha
    canvas += rng.normal(0, 4.0, canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    label = int(labels[index])
    return Rendered(image, digit_caption(label, rng), "sklearn_digits", str(label), [])


def _random_crop(array: np.ndarray, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
    height, width = array.shape[:2]
    area = height * width * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    crop_w = int(min(width, max(16, round(np.sqrt(area * aspect)))))
    crop_h = int(min(height, max(16, round(np.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
    return array[y0 : y0 + crop_h, x0 : x0 + crop_w]


def render_photo(name: str, size: int, rng: np.random.Generator) -> Rendered:
    """A random crop (10-50% of the area) of photo ``name``, resized to ``size`` square, maybe flipped."""
    crop = _random_crop(photo(name), rng, (0.1, 0.5))
    image = Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    subject = PHOTO_SOURCES[name]
    return Rendered(image, photo_caption(subject, rng), f"photo:{name}", name, [])


def render_face_photo(name: str, size: int, rng: np.random.Generator) -> Rendered:
    """A square crop of a portrait around its face (face 45-75% of the crop), resized to ``size``."""
    array = photo(name)
    subject, (fx0, fy0, fx1, fy1) = FACE_SOURCES[name]
    height, width = array.shape[:2]
    face = max(fx1 - fx0, fy1 - fy0)
    side = int(min(height, width, face / rng.uniform(0.45, 0.75)))
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    x0 = int(np.clip(cx - side / 2 + rng.uniform(-0.15, 0.15) * side, 0, width - side))
    y0 = int(np.clip(cy - side / 2 + rng.uniform(-0.15, 0.15) * side, 0, height - side))
    x0, y0 = min(x0, fx0), min(y0, fy0)
    x0, y0 = max(x0, fx1 - side), max(y0, fy1 - side)
    scale = size / side
    image = Image.fromarray(array[y0 : y0 + side, x0 : x0 + side]).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    box = (
        int(round((fx0 - x0) * scale)),
        int(round((fy0 - y0) * scale)),
        int(round((fx1 - x0) * scale)),
        int(round((fy1 - y0) * scale)),
    )
    box = tuple(int(np.clip(v, 0, size)) for v in box)
    return Rendered(image, photo_caption(subject, rng), f"face:{name}", name, [box])


def render_pasted_face(index: int, size: int, rng: np.random.Generator) -> Rendered:
    """LFW face ``index`` upscaled to 55-70% of the scene and pasted into a random background crop."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    scene = Image.fromarray(_random_crop(photo(background), rng, (0.2, 0.6))).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    side = int(size * rng.uniform(0.55, 0.7))
    face = Image.fromarray((lfw_faces()[index] * 255).astype(np.uint8), mode="L").convert("RGB")
    face = face.resize((side, side), Image.Resampling.BICUBIC)
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    scene.paste(face, (x0, y0))
    caption = photo_caption("the face of a person", rng)
    return Rendered(scene, caption, "face:lfw", "lfw", [(x0, y0, x0 + side, y0 + side)])


def encode(image: Image.Image, fmt: str = "jpg", quality: int = 90) -> bytes:
    """Encode a picture as JPEG (``jpg``) or PNG bytes."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Decode picture bytes to RGB."""
    return Image.open(io.BytesIO(data)).convert("RGB")
