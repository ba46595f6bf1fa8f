"""Frozen-trunk features for probing: the mean of the raw outputs of chosen blocks, per token.

Features are computed once per image (eval mode, ``torch.inference_mode``, bidirectional
attention) and kept token-level ``[N_img, N_tok, D]`` (float16 by default) so both the
attentive and the linear probe train on cached tensors instead of re-running the trunk.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from aim_kedro.aim.data import eval_transform
from aim_kedro.aim.evalsets import LabelledSet
from aim_kedro.aim.model import AIMTrunk
from aim_kedro.aim.presets import AIMConfig
from aim_kedro.io.decode import decode_image

logger = logging.getLogger(__name__)

_LAST_K = re.compile(r"^last(\d+)$")


@dataclass
class FrozenTrunk:
    """A trunk in eval mode with its config and where it came from (for reports)."""

    trunk: AIMTrunk
    cfg: AIMConfig
    source: str

    def __post_init__(self) -> None:
        self.trunk.eval()
        self.trunk.requires_grad_(False)


LayerSpec = str | int | Sequence[int]


def check_layer_spec(spec: LayerSpec) -> None:
    """Raise ValueError unless ``spec`` is a layer setting :func:`resolve_layers` understands
    for some depth: ``"lastK"`` (K >= 1), ``"best"``, ``"all"``, an int >= 1 or a non-empty
    list of block indices."""
    if isinstance(spec, str):
        match = _LAST_K.match(spec)
        if spec in ("best", "all") or (match and int(match.group(1)) >= 1):
            return
        raise ValueError(
            f"layers={spec!r} is not understood: use 'lastK' (e.g. 'last6'), 'best', 'all', "
            "an int or a list of block indices"
        )
    if isinstance(spec, bool) or not isinstance(spec, int | Sequence):
        raise ValueError(f"layers={spec!r} must be 'lastK', 'best', 'all', an int or a list")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"layers={spec} must be >= 1 when given as a count")
        return
    if not spec or any(isinstance(i, bool) or not isinstance(i, int) for i in spec):
        raise ValueError(f"layers={list(spec)} must be a non-empty list of block indices")


def resolve_layers(spec: LayerSpec, cfg: AIMConfig) -> list[int]:
    """Block indices for a ``layers`` setting.

    ``"lastK"`` (e.g. ``"last6"``): the last K blocks, all when depth < K; ``"best"``: the
    config's ``probe_layers`` (the published "best" 6 for the AIM v1 presets); ``"all"``;
    an int K (the last K); or an explicit list of indices (negative counts from the end).
    """
    check_layer_spec(spec)
    depth = cfg.depth
    if spec == "best":
        return list(cfg.probe_layers)
    if spec == "all":
        return list(range(depth))
    if isinstance(spec, str | int):
        k = spec if isinstance(spec, int) else int(spec[len("last"):])
        return list(range(max(depth - k, 0), depth))
    indices = [int(i) + depth if int(i) < 0 else int(i) for i in spec]
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"layers={list(spec)} invalid for a trunk of depth {depth}: indices are 0..{depth - 1}"
        )
    return indices


def trunk_from_state_dict(
    cfg: AIMConfig, state_dict: Mapping[str, Tensor], source: str
) -> FrozenTrunk:
    """Build an ``AIMTrunk`` from an AIM state dict (``trunk.*`` keys; the pixel head is ignored)."""
    trunk_state = {k[len("trunk.") :]: v for k, v in state_dict.items() if k.startswith("trunk.")}
    if not trunk_state:
        raise ValueError(f"{source}: the state dict has no 'trunk.*' tensors")
    trunk = AIMTrunk(cfg)
    trunk.load_state_dict(trunk_state, strict=True)
    return FrozenTrunk(trunk, cfg, source)


def random_trunk(cfg: AIMConfig, seed: int) -> FrozenTrunk:
    """A randomly initialised trunk (the model's own init) under a fixed seed: the probe baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = AIMTrunk(cfg)
    return FrozenTrunk(trunk, cfg, f"random_init(seed={seed})")


def image_batches(
    images: LabelledSet,
    transform: Callable[[Image.Image], Tensor],
    batch_size: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Decoded, transformed ``(images [B, C, H, W], labels [B])`` batches; undecodable images skipped."""
    batch: list[Tensor] = []
    labels: list[int] = []
    skipped = 0
    for key, data, label in images:
        try:
            batch.append(transform(decode_image(data)))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop an evaluation
            skipped += 1
            logger.warning("%s: skipping %s, cannot decode (%s)", images.name, key, exc)
            continue
        labels.append(label)
        if len(batch) == batch_size:
            yield torch.stack(batch), torch.tensor(labels, dtype=torch.long)
            batch, labels = [], []
    if batch:
        yield torch.stack(batch), torch.tensor(labels, dtype=torch.long)
    if skipped:
        logger.warning("%s: %d undecodable images skipped", images.name, skipped)


@torch.inference_mode()
def probe_tokens(trunk: AIMTrunk, images: Tensor, layers: Sequence[int]) -> Tensor:
    """Mean of the raw outputs of ``layers`` for a batch, bidirectional attention: ``[B, N, D]``."""
    outputs = trunk.forward_intermediates(images, list(layers), attn_mask=None)
    return torch.stack(outputs, dim=0).float().mean(dim=0)


def extract_features(
    frozen: FrozenTrunk,
    batches: Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[int],
    device: str = "cpu",
    store_dtype: torch.dtype = torch.float16,
    total: int | None = None,
    desc: str = "features",
) -> dict[str, Tensor]:
    """Token-level probe features of every image: ``{"tokens": [N, T, D], "labels": [N]}``.

    ``total`` is the number of images, for the progress bar. Tokens are computed in float32 and
    stored as ``store_dtype`` on the CPU.
    """
    start = time.perf_counter()
    trunk = frozen.trunk.to(device).eval()
    tokens: list[Tensor] = []
    labels: list[Tensor] = []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for images, batch_labels in batches:
            feats = probe_tokens(trunk, images.to(device), layers)
            tokens.append(feats.to(dtype=store_dtype, device="cpu"))
            labels.append(batch_labels.long().cpu())
            bar.update(len(images))
    if not tokens:
        raise ValueError(f"{desc}: no images to extract features from")
    out = {"tokens": torch.cat(tokens), "labels": torch.cat(labels)}
    seconds = time.perf_counter() - start
    logger.info(
        "%s: %d images -> tokens %s (%s) from %s, layers %s, in %.1fs",
        desc,
        len(out["labels"]),
        tuple(out["tokens"].shape),
        store_dtype,
        frozen.source,
        list(layers),
        seconds,
    )
    return out


def extract_split_features(
    frozen: FrozenTrunk,
    splits: Mapping[str, LabelledSet],
    layers: Sequence[int],
    batch_size: int = 64,
    device: str = "cpu",
    store_dtype: torch.dtype = torch.float16,
    crop_pct: float = 1.0,
) -> dict[str, Any]:
    """Features of every split (e.g. train, test) with what is needed to train probes on them.

    Returns ``{split: {"tokens", "labels"}, "layers", "num_classes", "num_heads", "embed_dim",
    "trunk"}``; the class count is the largest over the splits.
    """
    transform = eval_transform(frozen.cfg.img_size, crop_pct)
    out: dict[str, Any] = {}
    for name, labelled in splits.items():
        out[name] = extract_features(
            frozen,
            image_batches(labelled, transform, batch_size),
            layers,
            device=device,
            store_dtype=store_dtype,
            total=labelled.size,
            desc=f"{name} features",
        )
    out.update(
        layers=list(layers),
        num_classes=max(s.num_classes for s in splits.values()),
        num_heads=frozen.cfg.num_heads,
        embed_dim=frozen.cfg.embed_dim,
        trunk=frozen.source,
    )
    return out
