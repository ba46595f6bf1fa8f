"""A copy-detection descriptor: a small SSCD-style network trained on the pool's own images.

SSCD (Pizzi et al., 2022) learns a descriptor for which an image and its edited copies are
near neighbours: a CNN, two strongly augmented views of each image, InfoNCE between the views
and a KoLeo entropy term that spreads the descriptors out. Here the network is tiny and trained
from scratch at the start of curation on the pool's own images, with the DISC21 / AugLy
transform families applied on the fly in torch (crops, padding and letterbox, rotation, flips,
aspect, colour, greyscale, text / shape / image overlays, blur, pixelation, noise, JPEG-like
block quantisation). A pretrained descriptor (e.g. the SSCD TorchScript file) is used instead
when ``curation.dedup.descriptor.path`` names one. ``Describer`` turns decoded images into
L2-normalised float16 descriptors for the candidate search of ``dedup``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from aim_kedro.common.training import cpu_threads, param_groups, warmup_cosine
from aim_kedro.curation.borders import trim_borders
from aim_kedro.curation.copy_augment import augment, text_masks

logger = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DescriptorConfig:
    """The copy-detection descriptor (``curation.dedup.descriptor``).

    With ``path`` (a TorchScript file mapping a ``[B, 3, H, W]`` float batch, ImageNet-normalised,
    to ``[B, D]`` descriptors, e.g. SSCD's ``sscd_disc_mixup.torchscript.pt``) that model
    describes the images at ``image_size`` px and nothing is trained. Without it a network of
    ``widths`` channels per stage and ``dim`` outputs is trained for ``steps`` steps of
    ``batch_size`` images (two views each) on up to ``train_images`` pool images at
    ``image_size`` px. ``temperature`` is the InfoNCE temperature, ``entropy_weight`` the KoLeo
    weight. ``num_threads`` pins torch's threads (null: unchanged); ``device`` (cpu | cuda |
    auto) is where the network trains and describes.
    """

    path: str | None = None
    image_size: int = 64
    dim: int = 128
    widths: tuple[int, ...] = (32, 64, 128, 256)
    train_images: int = 4000
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.003
    weight_decay: float = 0.0001
    warmup_fraction: float = 0.05
    temperature: float = 0.05
    entropy_weight: float = 1.0
    seed: int = 0
    batch_size_inference: int = 256
    num_threads: int | None = None
    max_seconds: float | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        where = "curation.dedup.descriptor"
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"{where}.path must be a TorchScript file path or null, got {self.path!r}")
        for name, low in (("image_size", 16), ("dim", 8), ("train_images", 2), ("steps", 1),
                          ("batch_size", 2), ("batch_size_inference", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{name} must be an integer >= {low}, got {value!r}")
        widths = tuple(self.widths or ())
        if len(widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 4
                                  for w in widths):
            raise ValueError(
                f"{where}.widths must list >= 2 channel counts >= 4 (one per stage), got "
                f"{list(widths)}; e.g. [32, 64, 128, 256]"
            )
        object.__setattr__(self, "widths", widths)
        if self.image_size % (2 ** (len(widths) + 1)) != 0:
            raise ValueError(
                f"{where}.image_size must be a multiple of {2 ** (len(widths) + 1)} (2 ** (the "
                f"number of stages + 1)), got {self.image_size}"
            )
        for name in ("lr", "temperature"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{where}.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "entropy_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.warmup_fraction) < 1.0:
            raise ValueError(f"{where}.warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if self.num_threads is not None and (isinstance(self.num_threads, bool)
                                             or not isinstance(self.num_threads, int)
                                             or self.num_threads < 1):
            raise ValueError(f"{where}.num_threads must be >= 1 or null, got {self.num_threads!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"{where}.device must be cpu, cuda or auto, got {self.device!r}")
        if self.max_seconds is not None and not float(self.max_seconds) > 0:
            raise ValueError(f"{where}.max_seconds must be > 0 or null, got {self.max_seconds!r}")

    def torch_device(self) -> torch.device:
        """The device ``device`` names (auto: cuda when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def trains(self) -> bool:
        """Whether a network is trained on the pool (no pretrained ``path``)."""
        return self.path is None

    def check_path(self) -> None:
        """A pretrained descriptor's file must exist (checked before any work)."""
        if self.path is not None and not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"curation.dedup.descriptor.path {self.path} does not exist; give a TorchScript "
                "descriptor file (e.g. sscd_disc_mixup.torchscript.pt) or null to train one "
                "on the pool"
            )


class _Block(nn.Module):
    """A residual block: two 3x3 convolutions, the first with ``stride``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class CopyDescriptorNet(nn.Module):
    """A small ResNet on luminance: a stride-2 stem, one residual block per stage (each halving
    the size),
    GeM pooling and a linear projection to ``dim``, L2-normalised. Takes ``[B, 3, H, W]`` in
    [0, 1] (it normalises itself)."""

    def __init__(self, widths: Sequence[int], dim: int) -> None:
        super().__init__()
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks = [_Block(widths[max(i - 1, 0)], widths[i], 2) for i in range(len(widths))]
        self.blocks = nn.Sequential(*blocks)
        self.gem_p = nn.Parameter(torch.tensor(3.0))
        self.proj = nn.Linear(widths[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # luminance, standardised per image: colour, greyscale, brightness and contrast edits
        # leave it (nearly) unchanged, so the network spends its capacity on structure
        grey = (x * self.luma).sum(1, keepdim=True)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        std = grey.std(dim=(2, 3), keepdim=True)
        x = self.blocks(self.stem((grey - mean) / (std + 0.02)))
        pooled = x.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)
        return F.normalize(self.proj(pooled), dim=1)


def to_tensor(images: Sequence[Image.Image], size: int, trim: bool = True) -> torch.Tensor:
    """Decoded images as a ``[B, 3, size, size]`` uint8 tensor, each cut to its uniform-border
    box first (``trim``: letterbox bars and padding go) and squashed to a square."""
    arrays = [np.asarray((trim_borders(im) if trim else im).convert("RGB")
                         .resize((size, size), Image.Resampling.BILINEAR)) for im in images]
    if not arrays:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --- training -----------------------------------------------------------------------------


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of two views (row i of ``a`` and of ``b`` are one image) against all others."""
    z = torch.cat([a, b])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def koleo(z: torch.Tensor) -> torch.Tensor:
    """The KoLeo differential-entropy estimate (minus the mean log distance to the nearest
    neighbour), which SSCD adds so that descriptors spread over the sphere."""
    with torch.no_grad():
        dots = z @ z.T
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    return -torch.log((z - z[nearest]).norm(dim=1) + 1e-8).mean()


def train_copy_detector(
    images: torch.Tensor, cfg: DescriptorConfig, progress: bool = True
) -> dict[str, Any]:
    """Train ``CopyDescriptorNet`` on ``images`` (``[N, 3, S, S]`` uint8 at
    ``cfg.image_size``); return the checkpoint (config, state_dict, metadata)."""
    if len(images) < 2:
        raise ValueError(
            f"the copy detector needs at least 2 decodable pool images to train on, got "
            f"{len(images)}; set curation.dedup.descriptor.path to a pretrained descriptor"
        )
    start = time.perf_counter()
    device = cfg.torch_device()
    g = torch.Generator().manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    model = CopyDescriptorNet(cfg.widths, cfg.dim).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, float(cfg.weight_decay)), lr=float(cfg.lr))
    warmup = int(cfg.steps * float(cfg.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.steps, max(warmup, 1)))
    texts = text_masks(cfg.image_size, 64, np.random.default_rng(int(cfg.seed)))
    batch = min(int(cfg.batch_size), len(images))
    losses: list[float] = []
    steps = 0
    with cpu_threads(cfg.num_threads):
        model.train()
        bar = tqdm(range(cfg.steps), desc="copy detector", unit="step", disable=not progress)
        for _ in bar:
            pick = torch.randperm(len(images), generator=g)[:batch]
            x = images[pick].float().div(255)
            a = model(augment(x, texts, g).to(device))
            b = model(augment(x, texts, g).to(device))
            loss = info_nce(a, b, float(cfg.temperature))
            if cfg.entropy_weight:
                loss = loss + float(cfg.entropy_weight) * 0.5 * (koleo(a) + koleo(b))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            steps += 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if cfg.max_seconds is not None and time.perf_counter() - start > float(cfg.max_seconds):
                break
    model.eval()
    head = float(np.mean(losses[: max(1, len(losses) // 10)]))
    tail = float(np.mean(losses[-max(1, len(losses) // 10):]))
    metadata = {"images": int(len(images)), "steps": steps, "initial_loss": round(head, 4),
                "final_loss": round(tail, 4), "seconds": round(time.perf_counter() - start, 3)}
    logger.info("copy detector: %d steps on %d images, loss %.3f -> %.3f in %.1f s", steps,
                len(images), head, tail, metadata["seconds"])
    return {"config": {**asdict(cfg), "widths": list(cfg.widths)},
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "metadata": metadata}


# --- inference ----------------------------------------------------------------------------


class Describer:
    """Descriptors of decoded images: ``describe(images)`` gives ``[B, D]`` float16, L2-normalised."""

    def __init__(self, model: nn.Module, image_size: int, batch_size: int = 256,
                 num_threads: int | None = None, name: str = "trained",
                 device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_threads = num_threads
        self.name = name
        probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        with torch.no_grad(), cpu_threads(num_threads):
            self.dim = int(self.model(probe).shape[1])

    def describe_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Descriptors of a ``[B, 3, S, S]`` uint8 batch."""
        out = []
        with torch.no_grad(), cpu_threads(self.num_threads):
            for start in range(0, len(x), self.batch_size):
                batch = x[start : start + self.batch_size].to(self.device).float().div(255)
                out.append(F.normalize(self.model(batch).float(), dim=1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float16)
        return np.concatenate(out).astype(np.float16)

    def describe(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Descriptors of decoded images (any size: squashed to ``image_size``)."""
        return self.describe_tensor(to_tensor(images, self.image_size))


class _Normalised(nn.Module):
    """A TorchScript descriptor fed ImageNet-normalised input, as SSCD's files expect."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted((x - self.mean) / self.std)


def load_describer(cfg: DescriptorConfig, checkpoint: Mapping[str, Any] | None) -> Describer:
    """The describer of ``cfg``: the TorchScript file at ``cfg.path``, else the network of the
    ``copy_detector`` checkpoint (its own config decides the architecture)."""
    if cfg.path is not None:
        cfg.check_path()
        scripted = torch.jit.load(cfg.path, map_location="cpu")
        return Describer(_Normalised(scripted), cfg.image_size, cfg.batch_size_inference,
                         cfg.num_threads, name=os.path.basename(cfg.path),
                         device=cfg.torch_device())
    if not checkpoint or not checkpoint.get("state_dict"):
        raise ValueError(
            "the copy_detector checkpoint is empty; run the train_copy_detector node first, or "
            "set curation.dedup.descriptor.path to a pretrained descriptor"
        )
    saved = dict(checkpoint["config"])
    model = CopyDescriptorNet(tuple(saved["widths"]), int(saved["dim"]))
    model.load_state_dict(checkpoint["state_dict"])
    return Describer(model, int(saved["image_size"]), cfg.batch_size_inference, cfg.num_threads,
                     device=cfg.torch_device())


__all__ = [
    "CopyDescriptorNet",
    "DescriptorConfig",
    "Describer",
    "info_nce",
    "koleo",
    "load_describer",
    "to_tensor",
    "train_copy_detector",
]
