"""The one image decoder: bytes in, an upright 8-bit RGB image out, or a ``DecodeError`` that says why.

Every stage that looks at pixels (index, scoring, faces, subset, pre-training, probes) decodes
through ``decode_image``, so EXIF orientation, the decompression-bomb guard and the conversion of
every Pillow mode (16-bit and float greyscale, transparency, CMYK, palettes, animations) apply
the same way everywhere. Decoding is strict: Pillow never fills a truncated image in, and a JPEG
whose scan data libjpeg only warns about (valid header, garbage entropy-coded data, which Pillow
decodes to noise) is rejected with libjpeg's message, checked by a second, scaled decode.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# libjpeg's messages for damaged data (warnings it recovers from by inventing pixels, and
# structure errors); anything else (e.g. TurboJPEG's "could not determine subsampling level"
# on rare but valid layouts) leaves the verdict to Pillow.
_JPEG_DAMAGE = (
    "Corrupt JPEG data",
    "Premature end of JPEG file",
    "Invalid SOS parameters",
    "Inconsistent progression sequence",
    "Invalid JPEG file structure",
    "Bogus",
)


class DecodeError(Exception):
    """A sample's image cannot be decoded; ``str(exc)`` is the ``reject_detail``."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit and turn its warning into an error, then restore."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def no_truncated_images() -> Iterator[None]:
    """Pillow's ``LOAD_TRUNCATED_IMAGES`` off (another library may have turned it on), then
    restored: a truncated image is an error, never grey-filled."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def check_jpeg_data(data: bytes) -> None:
    """Raise ``DecodeError("corrupt jpeg: <libjpeg's message>")`` when libjpeg reports damaged
    data in a JPEG, warnings included (a decode at 1/8 scale: every coefficient is still
    entropy-decoded, the IDCT is cheap)."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)
    except ValueError as exc:
        message = str(exc)
        if message.startswith(_JPEG_DAMAGE):
            raise DecodeError(f"corrupt jpeg: {message}") from exc


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale scaled to 8 bits (Pillow would clip instead)."""
    arr = np.asarray(image).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    top = float(finite.max()) if finite.size else 0.0
    if image.mode == "F":
        low = float(finite.min()) if finite.size else 0.0
        scale = 255.0 / (top - low) if top > low else 0.0
        arr = (arr - low) * scale
    elif top > 255:
        arr = arr * (255.0 / (65535.0 if top <= 65535 else top))
    arr = np.nan_to_num(arr, nan=0.0)
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: transparency composited on white, wide greyscale rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        return _on_white(image)
    if mode.startswith("I") or mode == "F":
        return _wide_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise DecodeError(f"unsupported image mode {mode}: {exc}") from exc


_MAGIC = (
    (b"\xff\xd8", "jpeg"),
    (b"\x89PNG", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_format(data: bytes) -> str:
    """The image format its magic bytes announce ("image" when unknown), for error messages."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return "image"


def decode_image(data: bytes, max_pixels: int | None = None, strict: bool = True) -> Image.Image:
    """Decode image bytes to an upright RGB image (EXIF orientation applied, first frame).

    Raises ``DecodeError`` whose message names what is wrong: "zero-byte image", "cannot identify
    image", "decompression bomb N px", "truncated jpeg: ...", "corrupt jpeg: Corrupt JPEG data:
    bad Huffman code" (``strict``: libjpeg's warnings are errors, ``check_jpeg_data``).
    ``max_pixels`` is Pillow's decompression-bomb limit for this call (None: the current
    ``Image.MAX_IMAGE_PIXELS``); it is set and restored around the decode only, never across a
    generator's ``yield``.
    """
    if len(data) == 0:
        raise DecodeError("zero-byte image")
    guard = pixel_limit(max_pixels) if max_pixels is not None else contextlib.nullcontext()
    fmt = sniff_format(data)
    try:
        with guard, no_truncated_images():
            image = Image.open(io.BytesIO(data))
            fmt = (image.format or fmt).lower()
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise DecodeError(f"decompression bomb {image.width * image.height} px")
            image.seek(0)
            image.load()
            if strict and fmt in ("jpeg", "mpo"):
                check_jpeg_data(data)
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a good image
                upright = image
            return to_rgb(upright if upright is not None else image)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        match = _BOMB_PIXELS.search(str(exc))
        pixels = match.group(1) if match else "?"
        raise DecodeError(f"decompression bomb {pixels} px") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("cannot identify image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower() or isinstance(exc, EOFError):
            raise DecodeError(f"truncated {fmt}: {message}") from exc
        raise DecodeError(f"broken {fmt}: {message}") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt sample, never a crash
        raise DecodeError(f"broken {fmt}: {type(exc).__name__}: {exc}") from exc


def decode_or_none(data: bytes | Image.Image | None, max_pixels: int | None = None) -> Image.Image | None:
    """``decode_image`` for callers that skip what cannot be used: None instead of an error.

    A PIL image is converted to RGB (``to_rgb``) as it is.
    """
    if data is None:
        return None
    if isinstance(data, Image.Image):
        return to_rgb(data)
    try:
        return decode_image(bytes(data), max_pixels)
    except DecodeError:
        return None


__all__ = [
    "DecodeError",
    "check_jpeg_data",
    "decode_image",
    "decode_or_none",
    "no_truncated_images",
    "pixel_limit",
    "sniff_format",
    "to_rgb",
]
