"""The copy-detection benchmark pool of ``bench/dedup.py``, from offline sources the sample never uses.

Distinct images: tiles of photos that installed packages ship and the sample does not use
(skimage's camera, text, logo, Shepp-Logan phantom, microaneurysms; matplotlib's logos, the
MRI slice and two elevation models rendered with a colour map), matplotlib charts of random
data, and procedural scenes (gradients, textures, shapes, words). Copies: the DISC21 / AugLy
transform families applied to distinct images by AugLy (``augly.image``; its ``meme_format``
fails on Pillow >= 10, so the meme frame is drawn here with AugLy's font). Hard negatives: two
crops of one picture (a photo or a large scene, one per pair) overlapping < 25% of either, and
two renders of different sklearn digits of one class. Eval leaks: copies of images of a
separate evaluation set.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import matplotlib

matplotlib.use("Agg")
import matplotlib.cbook  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

try:
    import augly.image as imaugs
    import augly.utils as augly_utils
except ImportError as exc:  # pragma: no cover - a clear message for the bench user
    raise SystemExit(
        "bench/dedup.py applies the transforms with AugLy: pip install augly==1.0.0 (no extras: "
        "the [image] extra pins Pillow < 9)"
    ) from exc

WORDS = ("sale", "hello", "breaking", "news", "photo", "wow", "copy", "today", "look", "summer",
         "best", "2024", "free", "love", "city", "meme", "when you", "top text", "live", "new")


@dataclass
class BenchItem:
    """One pool (or evaluation) image: its role, the family that made it, and its source."""

    uid: str
    image: Image.Image
    role: str  # distinct | copy | hard_negative | leak | eval
    family: str | None = None
    source: str | None = None  # the uid (or eval id) this copies, or the pair id
    extra: dict = field(default_factory=dict)


def _rgb(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = ((array - low) / max(high - low, 1e-9) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        back = Image.new("RGB", image.size, (255, 255, 255))
        back.paste(image, mask=image.split()[3])
        return back
    return image.convert("RGB")


def _mpl_sample(name: str) -> Image.Image:
    with matplotlib.cbook.get_sample_data(name) as f:
        return _rgb(np.asarray(Image.open(io.BytesIO(f.read()))))


def _colour_map(values: np.ndarray, cmap: str) -> Image.Image:
    low, high = np.percentile(values, [1, 99])
    scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
    return _rgb((matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8))


@cache
def tile_photos() -> dict[str, Image.Image]:
    """Photos cut into non-overlapping tiles for the distinct images."""
    with matplotlib.cbook.get_sample_data("s1045.ima.gz") as f:  # opened decompressed
        mri = f.read()
    mri = np.frombuffer(mri, np.uint16).astype(np.float32).reshape(256, 256)
    return {
        "logo": _rgb(skimage.data.logo()),
        "text": _rgb(skimage.data.text()),
        "phantom": _rgb(skimage.data.shepp_logan_phantom()),
        "microaneurysms": _rgb(skimage.data.microaneurysms()),
        "mpl_logo": _mpl_sample("logo2.png"),
        "minduka": _mpl_sample("Minduka_Present_Blue_Pack.png"),
        "mri": _colour_map(mri, "bone"),
    }


@cache
def crop_photos() -> dict[str, Image.Image]:
    """Photos that the hard-negative crop pairs are cut from."""
    topo = matplotlib.cbook.get_sample_data("topobathy.npz")["topo"]
    dem = matplotlib.cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]
    return {
        "camera": _rgb(skimage.data.camera()),
        "topobathy": _colour_map(np.asarray(topo, np.float32), "terrain"),
        "jacksboro": _colour_map(np.asarray(dem, np.float32), "gist_earth"),
    }


def photo_tiles(size: int) -> list[tuple[str, Image.Image]]:
    """Non-overlapping tiles (about 128 px in the original) of each tile photo, at ``size``."""
    tiles = []
    for name, photo in tile_photos().items():
        w, h = photo.size
        nx, ny = max(1, round(w / 128)), max(1, round(h / 128))
        for i in range(nx):
            for j in range(ny):
                box = (i * w // nx, j * h // ny, (i + 1) * w // nx, (j + 1) * h // ny)
                tile = photo.crop(box)
                if np.asarray(tile.convert("L"), np.float32).std() < 25:
                    continue  # a plain tile (white paper, black background) is no distinct picture
                tiles.append((f"{name}-{i}-{j}", tile.resize((size, size), Image.Resampling.BICUBIC)))
    return tiles


def chart(rng: np.random.Generator, size: int) -> Image.Image:
    """A matplotlib chart of random data (line, bar, scatter or area), like a web figure."""
    fig = plt.figure(figsize=(size / 64, size / 64), dpi=64)
    ax = fig.add_subplot(111)
    kind = rng.integers(4)
    x = np.arange(int(rng.integers(8, 40)))
    colour = rng.random(3) * 0.8
    if kind == 0:
        for _ in range(int(rng.integers(1, 4))):
            ax.plot(x, np.cumsum(rng.normal(size=len(x))), color=rng.random(3) * 0.8, lw=2)
    elif kind == 1:
        ax.bar(x[:12], rng.random(min(12, len(x))), color=colour)
    elif kind == 2:
        ax.scatter(rng.normal(size=60), rng.normal(size=60), c=rng.random((60, 3)), s=30)
    else:
        ax.fill_between(x, np.cumsum(rng.random(len(x))), color=colour, alpha=0.7)
    ax.set_title(" ".join(rng.choice(WORDS, 2)), fontsize=9)
    if rng.random() < 0.5:
        ax.grid(True)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return image.resize((size, size), Image.Resampling.BICUBIC)


def scene(rng: np.random.Generator, size: int) -> Image.Image:
    """A procedural picture: a gradient or texture, random shapes and maybe a word."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.random(3) * 255, rng.random(3) * 255
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    canvas = a * (1 - t) + b * t
    if rng.random() < 0.5:
        blobs = skimage.data.binary_blobs(size, blob_size_fraction=rng.uniform(0.05, 0.2),
                                          rng=int(rng.integers(1 << 30)))
        canvas = np.where(blobs[..., None], canvas * 0.6 + rng.random(3) * 100, canvas)
    canvas += rng.normal(0, rng.uniform(1, 8), canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 10, size // 2, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
            draw.polygon(points, fill=colour)
    if rng.random() < 0.4:
        font = ImageFont.truetype(_font(rng), int(size * rng.uniform(0.08, 0.15)))
        draw.text(tuple(int(v) for v in rng.integers(0, size // 2, 2)), str(rng.choice(WORDS)),
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)), font=font)
    return image


def _font(rng: np.random.Generator) -> str:
    fonts = ("Montserrat-Bold.ttf", "OpenSans-Regular.ttf", "Impact.ttf", "Ubuntu-R.ttf",
             "IBMPlexSerif-Regular.ttf")
    return os.path.join(augly_utils.FONTS_DIR, str(rng.choice(fonts)))


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.images.astype(np.float32), data.target


def digit(index: int, rng: np.random.Generator, size: int) -> Image.Image:
    """A digit render like the sample's (dark ink on light paper of random hues, random place)."""
    images, _ = _digits()
    glyph = Image.fromarray((images[index] / 16 * 255).astype(np.uint8), mode="L")
    side = int(rng.integers(int(size * 0.6), int(size * 0.9) + 1))
    alpha = np.asarray(glyph.resize((side, side), Image.Resampling.BICUBIC), np.float32)[..., None] / 255
    canvas = np.ones((size, size, 3), np.float32) * rng.integers(150, 256, 3)
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    ink = rng.integers(0, 110, 3).astype(np.float32)
    patch = canvas[y0:y0 + side, x0:x0 + side]
    canvas[y0:y0 + side, x0:x0 + side] = patch * (1 - alpha) + ink * alpha
    canvas += rng.normal(0, 4.0, canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def crop_pair(photo: Image.Image, rng: np.random.Generator, size: int,
              max_overlap: float = 0.25) -> tuple[Image.Image, Image.Image, float]:
    """Two crops of one photo (each 40-70% of the side) whose intersection is below
    ``max_overlap`` of either crop's area; returns them at ``size`` and the overlap."""
    w, h = photo.size
    for _ in range(1000):
        boxes = []
        for _ in range(2):
            side = int(min(w, h) * rng.uniform(0.4, 0.7))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            boxes.append((x0, y0, x0 + side, y0 + side))
        (a0, a1, a2, a3), (b0, b1, b2, b3) = boxes
        inter = max(0, min(a2, b2) - max(a0, b0)) * max(0, min(a3, b3) - max(a1, b1))
        overlap = inter / min((a2 - a0) * (a3 - a1), (b2 - b0) * (b3 - b1))
        if 0 < overlap < max_overlap:
            crops = [photo.crop(box).resize((size, size), Image.Resampling.BICUBIC) for box in boxes]
            return crops[0], crops[1], overlap
    raise RuntimeError("no crop pair with the wanted overlap")


def _meme(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A meme frame: a white (or black) caption bar above the picture (AugLy's meme_format)."""
    w, h = image.size
    bar = int(h * rng.uniform(0.15, 0.35))
    white = rng.random() < 0.7
    out = Image.new("RGB", (w, h + bar), (255, 255, 255) if white else (0, 0, 0))
    out.paste(image, (0, bar))
    font = ImageFont.truetype(os.path.join(augly_utils.FONTS_DIR, "Impact.ttf"), int(bar * 0.5))
    ImageDraw.Draw(out).text((int(w * 0.05), int(bar * 0.2)), " ".join(rng.choice(WORDS, 2)),
                             fill=(0, 0, 0) if white else (255, 255, 255), font=font)
    return out


def _emoji(rng: np.random.Generator) -> str:
    folder = os.path.join(augly_utils.EMOJI_DIR, "smileys")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    return os.path.join(folder, str(rng.choice(files)))


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    keep = rng.uniform(0.5, 0.85)  # of the area: "crops up to 50%"
    aspect = rng.uniform(0.8, 1.25)
    fw, fh = min(1.0, np.sqrt(keep * aspect)), min(1.0, np.sqrt(keep / aspect))
    x1, y1 = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
    return imaugs.crop(image, x1=x1, y1=y1, x2=x1 + fw, y2=y1 + fh)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


Transform = Callable[[Image.Image, np.random.Generator, Callable[[], Image.Image]], Image.Image]

FAMILIES: dict[str, Transform] = {
    "crop_15_50": lambda im, r, o: _crop(im, r),
    "pad": lambda im, r, o: imaugs.pad(im, w_factor=r.uniform(0.1, 0.3),
                                      h_factor=r.uniform(0.1, 0.3), color=_colour(r)),
    "letterbox": lambda im, r, o: imaugs.pad(im, w_factor=r.uniform(0.15, 0.4), h_factor=0.0,
                                            color=(0, 0, 0)) if r.random() < 0.5 else
    imaugs.pad(im, w_factor=0.0, h_factor=r.uniform(0.15, 0.4), color=(0, 0, 0)),
    "rotate_3_25": lambda im, r, o: imaugs.rotate(im, degrees=float(r.choice([-1, 1]) *
                                                                    r.uniform(3, 25))),
    "hflip": lambda im, r, o: imaugs.hflip(im),
    "grayscale": lambda im, r, o: imaugs.grayscale(im),
    "color_jitter": lambda im, r, o: imaugs.color_jitter(
        im, brightness_factor=r.uniform(0.6, 1.4), contrast_factor=r.uniform(0.6, 1.4),
        saturation_factor=r.uniform(0.3, 2.0)),
    "brightness_contrast_25": lambda im, r, o: imaugs.contrast(
        imaugs.brightness(im, factor=float(r.choice([0.75, 1.25]))),
        factor=float(r.choice([0.75, 1.25]))),
    "saturation": lambda im, r, o: imaugs.saturation(im, factor=float(r.choice([0.3, 2.5]))),
    "overlay_text": lambda im, r, o: imaugs.overlay_text(
        im, text=[int(v) for v in r.integers(0, 60, int(r.integers(5, 12)))],
        font_size=r.uniform(0.1, 0.2), color=_colour(r), x_pos=r.uniform(0, 0.4),
        y_pos=r.uniform(0, 0.8)),
    "overlay_emoji": lambda im, r, o: imaugs.overlay_emoji(
        im, emoji_path=_emoji(r), emoji_size=r.uniform(0.2, 0.4), x_pos=r.uniform(0, 0.6),
        y_pos=r.uniform(0, 0.6)),
    "overlay_image": lambda im, r, o: imaugs.overlay_image(
        im, overlay=o(), overlay_size=r.uniform(0.25, 0.4), opacity=1.0,
        x_pos=r.uniform(0, 0.6), y_pos=r.uniform(0, 0.6)),
    "blur": lambda im, r, o: imaugs.blur(im, radius=r.uniform(1.5, 4)),
    "pixelization": lambda im, r, o: imaugs.pixelization(im, ratio=r.uniform(0.2, 0.4)),
    "noise": lambda im, r, o: imaugs.random_noise(im, var=r.uniform(0.01, 0.04),
                                                 seed=int(r.integers(1 << 30))),
    "jpeg_5_20": lambda im, r, o: imaugs.encoding_quality(im, quality=int(r.integers(5, 21))),
    "downscale": lambda im, r, o: imaugs.scale(im, factor=r.uniform(0.25, 0.6)),
    "aspect": lambda im, r, o: imaugs.change_aspect_ratio(im, ratio=float(
        r.choice([r.uniform(0.5, 0.8), r.uniform(1.25, 2.0)]))),
    "meme": lambda im, r, o: _meme(im, r),
    "screenshot": lambda im, r, o: imaugs.overlay_onto_screenshot(
        im, template_filepath=os.path.join(augly_utils.SCREENSHOT_TEMPLATES_DIR,
                                           str(r.choice(["web.png", "mobile.png"])))),
}
"""The DISC21 / AugLy transform families; flips are reported but carry no target."""


@dataclass
class BenchPool:
    """The benchmark pool and the evaluation set whose leaks it holds."""

    pool: list[BenchItem]
    eval_set: list[BenchItem]


def build_bench_pool(size: int, copies_per_family: int, distinct: int, hard_pairs: int,
                     eval_images: int, leaks: int, seed: int = 0) -> BenchPool:
    """Distinct images (tiles, charts, scenes), ``copies_per_family`` copies per family of
    distinct images, ``hard_pairs`` crop pairs and ``hard_pairs`` digit pairs, and ``leaks``
    copies (families in turn, flips excluded) of images of an ``eval_images`` evaluation set."""
    rng = np.random.default_rng(seed)
    pool: list[BenchItem] = []

    def new_uid(prefix: str) -> str:
        return f"{prefix}-{len(pool):05d}"

    def made(i: int) -> Image.Image:
        return chart(rng, size) if i % 3 == 0 else scene(rng, size)

    tiles = photo_tiles(size)
    originals: list[BenchItem] = []
    for name, image in tiles[:distinct]:
        originals.append(BenchItem(new_uid("tile"), image, "distinct", extra={"photo": name}))
        pool.append(originals[-1])
    for i in range(max(0, distinct - len(originals))):
        originals.append(BenchItem(new_uid("made"), made(i), "distinct"))
        pool.append(originals[-1])

    def overlay() -> Image.Image:
        return scene(rng, size)

    copy_sources = rng.permutation(len(originals))
    position = 0
    for family, transform in FAMILIES.items():
        for _ in range(copies_per_family):
            source = originals[int(copy_sources[position % len(originals)])]
            position += 1
            pool.append(BenchItem(new_uid("copy"), transform(source.image, rng, overlay).convert("RGB"),
                                  "copy", family, source.uid))

    photos = list(crop_photos().values())
    for p in range(hard_pairs):
        # one picture per pair (the photos, then large scenes), so crops of different pairs
        # never overlap
        picture = photos[p] if p < len(photos) else scene(rng, size * 5 // 2)
        a, b, overlap = crop_pair(picture, rng, size)
        for image in (a, b):
            pool.append(BenchItem(new_uid("hardcrop"), image, "hard_negative", "crop_pair",
                                  f"crop{p}", {"overlap": overlap}))
    _, labels = _digits()
    for p in range(hard_pairs):
        members = np.flatnonzero(labels == p % 10)
        i, j = rng.choice(members, 2, replace=False)
        for index in (i, j):
            pool.append(BenchItem(new_uid("harddigit"), digit(int(index), rng, size),
                                  "hard_negative", "digit_pair", f"digit{p}"))

    eval_set = [BenchItem(f"evalset/{i:05d}", made(i + 1), "eval") for i in range(eval_images)]
    leak_families = [f for f in FAMILIES if f != "hflip"]
    for i in range(leaks):
        family = leak_families[i % len(leak_families)]
        target = eval_set[int(rng.integers(len(eval_set)))]
        pool.append(BenchItem(new_uid("leak"), FAMILIES[family](target.image, rng, overlay)
                              .convert("RGB"), "leak", family, target.uid))
    order = rng.permutation(len(pool))
    return BenchPool([pool[int(i)] for i in order], eval_set)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes, as an img2dataset download stores them."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


__all__ = ["FAMILIES", "BenchItem", "BenchPool", "build_bench_pool", "encode_jpeg"]
