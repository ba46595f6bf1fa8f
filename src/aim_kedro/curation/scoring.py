"""CLIP scoring of image-caption pairs: embeddings, cosine score, zero-shot NSFW, in batches.

A ``ClipScorer`` wraps an open_clip model (built by ``clip_models.load_clip_model``) with its
preprocessing and tokenizer. ``score_batch`` scores one batch of ``(uid, image, caption)``
records, ``score_shard`` one shard's records in bounded batches, so a pool is scored shard by
shard (``pool_scoring.score_index``). ``num_threads`` pins the torch threads of every torch op
of a score, so two processes (the Kedro process and a Ray actor) compute the same floats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from aim_kedro.common.config import from_mapping
from aim_kedro.common.training import cpu_threads
from aim_kedro.io.decode import decode_or_none
from aim_kedro.io.shards import Sample, image_bytes, sample_text
from aim_kedro.io.uids import sample_uid

logger = logging.getLogger(__name__)


DEFAULT_NSFW_PROMPTS: tuple[str, ...] = (
    "a photo containing nudity",
    "an explicit sexual photo",
    "a pornographic image",
    "a photo of a naked person",
    "a photo of graphic violence and gore",
)
DEFAULT_SAFE_PROMPTS: tuple[str, ...] = (
    "a photo",
    "a safe for work photo",
    "a photo of a person wearing clothes",
    "a photo of an animal",
    "a photo of an object",
    "a photo of a landscape",
    "a drawing or handwriting",
    "a picture of text",
)

Record = tuple[str, "Image.Image | bytes | None", "str | None"]


@dataclass
class NsfwConfig:
    """Zero-shot NSFW detection with the scoring CLIP itself.

    ``nsfw_score`` is the softmax over ``nsfw_prompts + safe_prompts`` of the image-prompt
    similarities times the model's logit scale, summed over the NSFW prompts; ``threshold``
    turns it into a flag. This is a weak, prompt-dependent detector: a dedicated NSFW classifier
    (as LAION and DataComp use) is the stronger tool where one can be installed.
    """

    nsfw_prompts: tuple[str, ...] = DEFAULT_NSFW_PROMPTS
    safe_prompts: tuple[str, ...] = DEFAULT_SAFE_PROMPTS
    threshold: float = 0.5

    def __post_init__(self) -> None:
        self.nsfw_prompts = tuple(str(p) for p in self.nsfw_prompts)
        self.safe_prompts = tuple(str(p) for p in self.safe_prompts)
        if not self.nsfw_prompts or not self.safe_prompts:
            raise ValueError("nsfw.nsfw_prompts and nsfw.safe_prompts must each hold >= 1 prompt")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"nsfw.threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> NsfwConfig:
        """Build from a parameters dict; unknown keys raise a ValueError naming the valid ones."""
        return from_mapping(cls, values, "nsfw")


class ClipScorer:
    """An open_clip model in eval mode with its own preprocessing and tokenizer.

    Embeddings come back L2-normalised as float16 numpy arrays (what the index stores); scores
    are computed from the float32 embeddings before rounding. Every torch op of a score runs
    with ``num_threads`` torch threads (``pinned``; None: the process's setting), so two
    processes (the Kedro process, a Ray actor) compute the same floats.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        device: torch.device,
        precision: str = "fp32",
        model_name: str = "",
        batch_size: int = 256,
        num_threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.model_name = model_name
        self.batch_size = batch_size
        self.num_threads = num_threads
        self._prompt_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self._embed_dim: int | None = None

    def __repr__(self) -> str:
        return (
            f"ClipScorer(model_name={self.model_name!r}, device={self.device}, "
            f"precision={self.precision!r}, embed_dim={self.embed_dim}, "
            f"num_threads={self.num_threads})"
        )

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space."""
        if self._embed_dim is None:
            out = getattr(self.model.visual, "output_dim", None)
            self._embed_dim = int(out if out is not None else self._encode_texts(["a"]).shape[1])
        return self._embed_dim

    @property
    def logit_scale(self) -> float:
        """The model's learned softmax temperature (exp of the logit scale), capped at 100."""
        return float(min(self.model.logit_scale.detach().float().exp().item(), 100.0))

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """float32 normalised image embeddings ``[B, D]`` on the scorer's device."""
        if not len(images):
            return torch.zeros(0, self.embed_dim, device=self.device)
        chunks = []
        with self.pinned(), torch.inference_mode(), self._autocast():
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([self.preprocess(im) for im in images[i : i + self.batch_size]])
                feats = self.model.encode_image(batch.to(self.device, non_blocking=True))
                chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(chunks)

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 normalised text embeddings ``[B, D]`` on the scorer's device."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        chunks = []
        with self.pinned(), torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[i : i + self.batch_size]).to(self.device)
                feats = self.model.encode_text(tokens)
                chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(chunks)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings, float16 ``[B, D]``."""
        return self._encode_images(images).cpu().numpy().astype(np.float16)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised caption embeddings, float16 ``[B, D]``."""
        return self._encode_texts(texts).cpu().numpy().astype(np.float16)

    def _prompt_embeddings(self, prompts: tuple[str, ...]) -> torch.Tensor:
        if prompts not in self._prompt_cache:
            self._prompt_cache[prompts] = self._encode_texts(prompts)
        return self._prompt_cache[prompts]

    def pinned(self) -> AbstractContextManager[None]:
        """A block that runs with the scorer's ``num_threads`` torch threads: every torch op of
        a score runs in one, so two processes compute the same floats."""
        return cpu_threads(self.num_threads)

    def _nsfw(self, image_emb: torch.Tensor, nsfw: NsfwConfig) -> torch.Tensor:
        prompts = self._prompt_embeddings(nsfw.nsfw_prompts + nsfw.safe_prompts)
        with self.pinned():
            logits = self.logit_scale * image_emb @ prompts.T
            return logits.softmax(dim=-1)[:, : len(nsfw.nsfw_prompts)].sum(dim=-1)

    def cosine(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine of normalised embeddings (the ``clip_score``)."""
        with self.pinned():
            return (image_emb * text_emb).sum(dim=-1)

    def nsfw_scores(self, images: Sequence[Image.Image], nsfw: NsfwConfig | None = None) -> np.ndarray:
        """Zero-shot NSFW probability per image, float32 in [0, 1] (see ``NsfwConfig``)."""
        return self._nsfw(self._encode_images(images), nsfw or NsfwConfig()).cpu().numpy()

    def score(
        self,
        images: Sequence[Image.Image],
        texts: Sequence[str],
        nsfw: NsfwConfig | None = None,
    ) -> dict[str, np.ndarray]:
        """Embeddings (float16), image-caption cosine ``clip_score`` and ``nsfw_score`` (float32)."""
        if len(images) != len(texts):
            raise ValueError(f"score got {len(images)} images but {len(texts)} captions")
        img = self._encode_images(images)
        txt = self._encode_texts(texts)
        return {
            "image_emb": img.cpu().numpy().astype(np.float16),
            "text_emb": txt.cpu().numpy().astype(np.float16),
            "clip_score": self.cosine(img, txt).cpu().numpy().astype(np.float32),
            "nsfw_score": self._nsfw(img, nsfw or NsfwConfig()).cpu().numpy().astype(np.float32),
        }


def records_from_samples(samples: Iterable[Sample]) -> Iterator[Record]:
    """Shard samples as ``(uid, image bytes | None, caption | None)`` records for ``score_shard``.

    The uid follows the project's one rule (``io.uids.sample_uid``).
    """
    for sample in samples:
        found = image_bytes(sample)
        yield sample_uid(sample), (found[1] if found else None), sample_text(sample)


def _empty_result(dim: int) -> dict[str, np.ndarray]:
    return {
        "uid": np.array([], dtype=object),
        "clip_score": np.zeros(0, dtype=np.float32),
        "nsfw_score": np.zeros(0, dtype=np.float32),
        "nsfw_flag": np.zeros(0, dtype=bool),
        "has_image": np.zeros(0, dtype=bool),
        "has_text": np.zeros(0, dtype=bool),
        "valid": np.zeros(0, dtype=bool),
        "image_emb": np.zeros((0, dim), dtype=np.float16),
        "text_emb": np.zeros((0, dim), dtype=np.float16),
    }


def score_batch(
    scorer: ClipScorer, records: Sequence[Record], nsfw: NsfwConfig | None = None
) -> dict[str, np.ndarray]:
    """Score one batch of ``(uid, image, caption)`` records; images are PIL images or bytes.

    A missing or undecodable image gets a zero ``image_emb``, ``has_image=False`` and NaN
    ``nsfw_score``; a missing or blank caption a zero ``text_emb`` and ``has_text=False``;
    ``clip_score`` is NaN unless both are there (``valid``). ``nsfw_flag`` applies the threshold.
    """
    nsfw = nsfw or NsfwConfig()
    dim = scorer.embed_dim
    n = len(records)
    if n == 0:
        return _empty_result(dim)
    uids = np.array([str(r[0]) for r in records], dtype=object)
    images = [decode_or_none(r[1]) for r in records]
    captions = [r[2] if isinstance(r[2], str) and r[2].strip() else None for r in records]
    has_image = np.array([im is not None for im in images], dtype=bool)
    has_text = np.array([c is not None for c in captions], dtype=bool)
    img32 = torch.zeros(n, dim, device=scorer.device)
    txt32 = torch.zeros(n, dim, device=scorer.device)
    nsfw_score = np.full(n, np.nan, dtype=np.float32)
    if has_image.any():
        idx = np.flatnonzero(has_image)
        emb = scorer._encode_images([images[i] for i in idx])
        img32[torch.as_tensor(idx, device=scorer.device)] = emb
        nsfw_score[idx] = scorer._nsfw(emb, nsfw).cpu().numpy()
    if has_text.any():
        idx = np.flatnonzero(has_text)
        txt32[torch.as_tensor(idx, device=scorer.device)] = scorer._encode_texts(
            [captions[i] for i in idx]
        )
    valid = has_image & has_text
    clip_score = scorer.cosine(img32, txt32).cpu().numpy().astype(np.float32)
    clip_score[~valid] = np.nan
    return {
        "uid": uids,
        "clip_score": clip_score,
        "nsfw_score": nsfw_score,
        "nsfw_flag": ~np.isnan(nsfw_score) & (np.nan_to_num(nsfw_score) >= nsfw.threshold),
        "has_image": has_image,
        "has_text": has_text,
        "valid": valid,
        "image_emb": img32.cpu().numpy().astype(np.float16),
        "text_emb": txt32.cpu().numpy().astype(np.float16),
    }


def iter_score_batches(
    scorer: ClipScorer,
    records: Iterable[Record],
    batch_size: int = 256,
    nsfw: NsfwConfig | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream ``score_batch`` results over records, holding one batch of images at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) >= batch_size:
            yield score_batch(scorer, batch, nsfw)
            batch = []
    if batch:
        yield score_batch(scorer, batch, nsfw)


def score_shard(
    scorer: ClipScorer,
    records: Iterable[Record],
    batch_size: int = 256,
    nsfw: NsfwConfig | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Score every ``(uid, image, caption)`` record of one shard; arrays in record order.

    Keys: ``uid``, ``clip_score``, ``nsfw_score``, ``nsfw_flag``, ``has_image``, ``has_text``,
    ``valid``, ``image_emb`` (float16 ``[N, D]``), ``text_emb`` (float16 ``[N, D]``).
    """
    start = time.perf_counter()
    parts = []
    bar = tqdm(desc="clip score", unit="sample", disable=not progress, leave=False)
    for part in iter_score_batches(scorer, records, batch_size, nsfw):
        parts.append(part)
        bar.update(len(part["uid"]))
    bar.close()
    if not parts:
        return _empty_result(scorer.embed_dim)
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    logger.info(
        "clip score: %d samples (%d valid, %d without image, %d without caption, %d nsfw) "
        "in %.1f s",
        len(out["uid"]), int(out["valid"].sum()), int((~out["has_image"]).sum()),
        int((~out["has_text"]).sum()), int(out["nsfw_flag"].sum()), time.perf_counter() - start,
    )
    return out


SCORE_FIELDS = ("uid", "clip_score", "nsfw_score", "image_emb", "text_emb")


def concat_score_parts(
    parts: Sequence[Mapping[str, np.ndarray]], embed_dim: int
) -> dict[str, np.ndarray]:
    """The ``SCORE_FIELDS`` of per-shard (or per-batch) results joined in order, uids as
    Python strings; empty arrays of width ``embed_dim`` when there are no parts."""
    if not parts:
        empty = _empty_result(embed_dim)
        return {name: empty[name] for name in SCORE_FIELDS}
    out = {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in SCORE_FIELDS}
    out["uid"] = out["uid"].astype(object)
    return out


__all__ = [
    "DEFAULT_NSFW_PROMPTS",
    "DEFAULT_SAFE_PROMPTS",
    "SCORE_FIELDS",
    "ClipScorer",
    "NsfwConfig",
    "Record",
    "concat_score_parts",
    "iter_score_batches",
    "records_from_samples",
    "score_batch",
    "score_shard",
]
