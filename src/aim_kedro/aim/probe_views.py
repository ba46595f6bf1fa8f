"""The paper's probe recipe: probes trained on augmented views through the frozen trunk.

AIM trains its attentive probe for about 100 epochs on freshly augmented views of the labelled
images (random resized crop, flip, colour jitter, RandAugment), with weight decay 0.1 and
gradient clipping, and evaluates at crop 0.875 (resize 256, centre 224 for a 224 px trunk).
The cached recipe (:func:`aim_kedro.aim.probes.run_protocol` on stored features) sees one
un-augmented view per image; here every training batch goes through the trunk again, so each
epoch shows a new view of every image. Held-out and test images keep their cached eval-view
features. The encoded training images are held in memory (decoded per batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms

from aim_kedro.aim.data import IMAGENET_MEAN, IMAGENET_STD
from aim_kedro.aim.evalsets import LabelledSet
from aim_kedro.aim.features import FrozenTrunk, probe_tokens
from aim_kedro.io.decode import decode_image

logger = logging.getLogger(__name__)

RANDAUGMENT_OPS = 2
RANDAUGMENT_MAGNITUDE = 9  # timm's "rand-m9-mstd0.5", as torchvision's RandAugment has it


@dataclass(frozen=True)
class ViewAugmentation:
    """How a training view is drawn: RandomResizedCrop ``scale`` (bicubic), a horizontal flip,
    colour jitter of ``color_jitter`` (brightness, contrast, saturation; 0 turns it off) and
    RandAugment (2 ops, magnitude 9)."""

    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    color_jitter: float = 0.3
    randaugment: bool = True

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high <= 1, got {self.scale}")
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {self.color_jitter}")
        object.__setattr__(self, "scale", (low, high))


def probe_train_transform(img_size: int, aug: ViewAugmentation) -> Callable[[Image.Image], Tensor]:
    """A training view of ``img_size`` px, normalised as the trunk's inputs are."""
    steps: list[Callable] = [
        transforms.RandomResizedCrop(img_size, scale=aug.scale,
                                     interpolation=transforms.InterpolationMode.BICUBIC)
    ]
    if aug.flip:
        steps.append(transforms.RandomHorizontalFlip())
    if aug.color_jitter > 0:
        steps.append(transforms.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    if aug.randaugment:
        steps.append(transforms.RandAugment(RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


class TrunkViews:
    """``ProbeViews`` over labelled images: ``views[rows]`` selects images, ``.views(generator)``
    draws one augmented view of each, passes them through the frozen trunk and returns the mean
    of the ``layers`` outputs, float32 ``[B, T, D]`` (what the cached recipe stores per image)."""

    def __init__(
        self, images: Sequence[bytes], labels: Tensor, frozen: FrozenTrunk, layers: Sequence[int],
        transform: Callable[[Image.Image], Tensor], device: str = "cpu",
        rows: Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.frozen = images, labels.long(), frozen
        self.layers, self.transform, self.device = list(layers), transform, device
        self.rows = torch.arange(len(images)) if rows is None else rows.long()
        cfg = frozen.cfg
        self.shape = (len(self.rows), cfg.num_patches, cfg.embed_dim)

    @classmethod
    def from_labelled(
        cls, labelled: LabelledSet, frozen: FrozenTrunk, layers: Sequence[int],
        aug: ViewAugmentation, device: str = "cpu",
    ) -> TrunkViews:
        """Views of every decodable image of ``labelled``, in its order (undecodable ones are
        skipped, as :func:`aim_kedro.aim.features.image_batches` skips them for the cache)."""
        images: list[bytes] = []
        labels: list[int] = []
        for key, data, label in labelled:
            try:
                decode_image(data)
            except Exception as exc:  # noqa: BLE001 - skipped as the feature cache skips it
                logger.warning("%s: skipping %s, cannot decode (%s)", labelled.name, key, exc)
                continue
            images.append(data)
            labels.append(label)
        if not images:
            raise ValueError(f"{labelled.name}: no decodable image to draw training views from")
        transform = probe_train_transform(frozen.cfg.img_size, aug)
        return cls(images, torch.tensor(labels), frozen, layers, transform, device)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows: Tensor) -> TrunkViews:
        return TrunkViews(self.images, self.labels, self.frozen, self.layers, self.transform,
                          self.device, self.rows[rows])

    def row_labels(self) -> Tensor:
        """The labels of the selected rows (to check alignment with cached features)."""
        return self.labels[self.rows]

    def views(self, generator: torch.Generator) -> Tensor:
        """One fresh augmented view per selected image through the trunk: ``[B, T, D]``."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            batch = torch.stack([self.transform(decode_image(self.images[int(i)]))
                                 for i in self.rows])
        trunk = self.frozen.trunk.to(self.device)
        return probe_tokens(trunk, batch.to(self.device), self.layers).clone()
