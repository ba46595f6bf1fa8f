"""The copy detector's training edits: the DISC21 / AugLy transform families, batched in torch.

``augment`` turns a batch of images into strongly edited copies (the second view of SSCD-style
training): crops, aspect changes, rotations, flips, zoom-out with padding or letterbox bars,
colour, brightness, contrast, saturation and greyscale, overlays of words (also as a meme
caption in the padding), shapes and other images, blur, pixelation, noise and JPEG-like block
quantisation, each with its own probability. ``text_masks`` renders the word bank once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

WORDS = ("sale", "news", "wow", "lol", "2024", "look", "free", "copy", "photo", "when",
         "top text", "best", "love", "new", "city", "hello")


def text_masks(size: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` masks ``[count, 1, size, size]`` of words at random places and sizes (Pillow's
    built-in font), the bank the text-overlay augmentation draws from."""
    masks = []
    for _ in range(count):
        mask = Image.new("L", (size, size), 0)
        font = ImageFont.load_default(size=max(6, int(size * rng.uniform(0.1, 0.25))))
        text = " ".join(rng.choice(WORDS, int(rng.integers(1, 3))))
        xy = (int(rng.integers(-size // 4, size // 2)), int(rng.integers(0, size * 3 // 4)))
        ImageDraw.Draw(mask).text(xy, text, fill=255, font=font)
        masks.append(np.asarray(mask))
    return torch.from_numpy(np.stack(masks)).float().div(255).unsqueeze(1)


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _chance(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


DCT8 = torch.tensor(
    [[math.sqrt((1 if k == 0 else 2) / 8) * math.cos(math.pi * (2 * n + 1) * k / 16)
      for n in range(8)] for k in range(8)], dtype=torch.float32)


def _jpeg_like(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG's 8x8 block-DCT quantisation (uniform step growing as ``quality`` drops) on each
    channel: the blocking and ringing of a low-quality re-encode, in torch."""
    b, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    y = F.pad(x, (0, pw, 0, ph), mode="replicate") * 255 - 128
    hh, ww = y.shape[2] // 8, y.shape[3] // 8
    blocks = y.view(b, c, hh, 8, ww, 8).permute(0, 1, 2, 4, 3, 5)
    coef = DCT8 @ blocks @ DCT8.T
    freq = torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)
    step = (1 + freq.float() * 2) * (50.0 / quality.clamp(1, 100)).view(b, 1, 1, 1, 1, 1) * 4
    coef = torch.round(coef / step) * step
    out = (DCT8.T @ coef @ DCT8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hh * 8, ww * 8)
    return ((out + 128) / 255)[:, :, :h, :w]


def augment(x: torch.Tensor, texts: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A strongly edited copy of each image of ``x`` (``[B, 3, S, S]`` float in [0, 1]): one
    random geometric edit (crop, aspect, rotation, flip, zoom-out with padding or letterbox),
    colour changes, overlays (a word, a shape, another image of the batch) and degradations
    (blur, pixelation, noise, JPEG-like quantisation), each applied with its own probability."""
    b, _, s, _ = x.shape
    # geometry: where each output pixel samples the input (affine_grid's [-1, 1] coordinates)
    area = _uniform(b, 0.3, 1.0, g)
    aspect = torch.exp(_uniform(b, math.log(0.6), math.log(1.66), g))
    sx = torch.sqrt(area * aspect).clamp(max=1.0)
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    zoom = _chance(b, 0.3, g)
    shrink = _uniform(b, 1.1, 1.8, g)
    letterbox = _chance(b, 0.4, g) & zoom
    sx = torch.where(zoom, shrink, sx)
    sy = torch.where(zoom & ~letterbox, shrink, torch.where(zoom, torch.ones(b), sy))
    swap = _chance(b, 0.5, g) & letterbox
    sx, sy = torch.where(swap, sy, sx), torch.where(swap, sx, sy)
    angle = torch.where(_chance(b, 0.4, g), _uniform(b, -25, 25, g), torch.zeros(b)) * math.pi / 180
    flip = torch.where(_chance(b, 0.5, g), -1.0, 1.0)
    tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sx).abs()
    ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - sy).abs()
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                         torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    inside = F.grid_sample(torch.ones(b, 1, s, s), grid, align_corners=False)
    fill = torch.where(_chance(b, 0.5, g).view(b, 1, 1, 1), torch.zeros(b, 3, 1, 1),
                       torch.rand(b, 3, 1, 1, generator=g))
    x = F.grid_sample(x, grid, align_corners=False) * inside + fill * (1 - inside)

    # colour: brightness, contrast, saturation, greyscale
    jitter = _chance(b, 0.8, g).view(b, 1, 1, 1)
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    bright = _uniform(b, 0.6, 1.4, g).view(b, 1, 1, 1)
    contrast = _uniform(b, 0.6, 1.4, g).view(b, 1, 1, 1)
    saturation = _uniform(b, 0.0, 2.0, g).view(b, 1, 1, 1)
    mean = grey.mean(dim=(2, 3), keepdim=True)
    coloured = ((grey + (x - grey) * saturation - mean) * contrast + mean) * bright
    x = torch.where(jitter, coloured, x)
    x = torch.where(_chance(b, 0.2, g).view(b, 1, 1, 1), grey.expand_as(x), x).clamp(0, 1)

    # overlays: a word (anywhere, or in the padding: a meme caption), a shape (emoji-like),
    # another image of the batch
    word = texts[torch.randint(len(texts), (b,), generator=g)] * _chance(b, 0.3, g).view(b, 1, 1, 1)
    caption = texts[torch.randint(len(texts), (b,), generator=g)] * (1 - inside)
    word = torch.maximum(word, caption * _chance(b, 0.5, g).view(b, 1, 1, 1))
    x = x * (1 - word) + torch.rand(b, 3, 1, 1, generator=g) * word
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    cx, cy = _uniform(b, -0.8, 0.8, g).view(b, 1, 1), _uniform(b, -0.8, 0.8, g).view(b, 1, 1)
    radius = _uniform(b, 0.15, 0.4, g).view(b, 1, 1)
    blob = (((xx - cx) ** 2 + (yy - cy) ** 2) < radius ** 2).float().unsqueeze(1)
    blob = blob * _chance(b, 0.2, g).view(b, 1, 1, 1)
    x = x * (1 - blob) + torch.rand(b, 3, 1, 1, generator=g) * blob
    scale = _uniform(b, 0.2, 0.45, g)
    ox, oy = _uniform(b, -1, 1, g), _uniform(b, -1, 1, g)
    paste = torch.stack([torch.stack([1 / scale, torch.zeros(b), -ox / scale], 1),
                         torch.stack([torch.zeros(b), 1 / scale, -oy / scale], 1)], 1)
    pgrid = F.affine_grid(paste, list(x.shape), align_corners=False)
    other = torch.roll(x, 1, 0)
    pmask = F.grid_sample(torch.ones(b, 1, s, s), pgrid, align_corners=False) > 0.5
    pmask = pmask & _chance(b, 0.2, g).view(b, 1, 1, 1)
    x = torch.where(pmask, F.grid_sample(other, pgrid, align_corners=False), x)

    # degradations: blur, pixelation, noise, JPEG-like quantisation
    sigma = _uniform(b, 0.5, 2.0, g)
    taps = torch.arange(-3, 4).float()
    kernel = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)
    flat = x.reshape(1, b * 3, s, s)
    flat = F.conv2d(F.pad(flat, (3, 3, 0, 0), mode="replicate"), kernel.view(b * 3, 1, 1, 7), groups=b * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 3, 3), mode="replicate"), kernel.view(b * 3, 1, 7, 1), groups=b * 3)
    x = torch.where(_chance(b, 0.25, g).view(b, 1, 1, 1), flat.view(b, 3, s, s), x)
    pixelate = _chance(b, 0.15, g)
    for i in torch.nonzero(pixelate).flatten().tolist():
        factor = int(torch.randint(2, 6, (1,), generator=g))
        small = F.avg_pool2d(x[i : i + 1], factor, ceil_mode=True)
        x[i] = F.interpolate(small, scale_factor=factor, mode="nearest")[0, :, :s, :s]
    noise = torch.randn(x.shape, generator=g) * _uniform(b, 0.01, 0.12, g).view(b, 1, 1, 1)
    x = x + noise * _chance(b, 0.25, g).view(b, 1, 1, 1)
    jpeg = _chance(b, 0.25, g)
    if jpeg.any():
        x[jpeg] = _jpeg_like(x[jpeg].clamp(0, 1), _uniform(int(jpeg.sum()), 5, 40, g))
    return x.clamp(0, 1)


__all__ = ["augment", "text_masks"]
