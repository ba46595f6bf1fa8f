"""CLIP scoring of image-caption pairs with open_clip: embeddings, cosine score, zero-shot NSFW.

``load_clip_model`` builds a ``ClipScorer`` from an open_clip name + pretrained tag, an
``hf-hub:`` repo, a local checkpoint file or ``local-dir:`` folder, or the checkpoint dict of
``filter_network.train_filter_network``. A model that would have to be downloaded while the
machine is offline fails at once with a message saying how to point at a local copy instead.
``score_shard`` scores one shard's records in bounded batches, so a pool is scored shard by shard.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import open_clip
import polars as pl
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from tqdm.auto import tqdm

from aim_kedro.common.config import from_mapping
from aim_kedro.curation.index import IndexConfig, decode_selected
from aim_kedro.curation.resume import (
    ShardResultCache,
    fingerprint,
    rows_fingerprint,
    tensors_fingerprint,
)
from aim_kedro.io.decode import decode_or_none
from aim_kedro.io.shards import (
    Sample,
    ShardSet,
    image_bytes,
    sample_text,
)
from aim_kedro.io.uids import sample_uid

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
HF_CONFIG_NAME = "open_clip_config.json"
HF_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 3.0

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


class ModelUnavailableError(RuntimeError):
    """A CLIP model that must be downloaded cannot be: the machine is offline or the Hub blocked."""


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


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unavailable CUDA request raises ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA but none is available; use 'auto' or 'cpu'")
    return resolved


class ClipScorer:
    """An open_clip model in eval mode with its own preprocessing and tokenizer.

    Embeddings come back L2-normalised as float16 numpy arrays (what the index stores); scores
    are computed from the float32 embeddings before rounding.
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
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.model_name = model_name
        self.batch_size = batch_size
        self._prompt_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self._embed_dim: int | None = None

    def __repr__(self) -> str:
        return (
            f"ClipScorer(model_name={self.model_name!r}, device={self.device}, "
            f"precision={self.precision!r}, embed_dim={self.embed_dim})"
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
        with torch.inference_mode(), self._autocast():
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
        with torch.inference_mode(), self._autocast():
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

    def _nsfw(self, image_emb: torch.Tensor, nsfw: NsfwConfig) -> torch.Tensor:
        prompts = self._prompt_embeddings(nsfw.nsfw_prompts + nsfw.safe_prompts)
        logits = self.logit_scale * image_emb @ prompts.T
        return logits.softmax(dim=-1)[:, : len(nsfw.nsfw_prompts)].sum(dim=-1)

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
            "clip_score": (img * txt).sum(dim=-1).cpu().numpy().astype(np.float32),
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
    clip_score = (img32 * txt32).sum(dim=-1).cpu().numpy().astype(np.float32)
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


def scorer_fingerprint(scorer: ClipScorer, nsfw: NsfwConfig, batch_size: int) -> str:
    """Identity of everything a score depends on: weights, precision, device type, prompts and
    batch size (batch composition can move float results in the last bits)."""
    return fingerprint(
        tensors_fingerprint(scorer.model.state_dict()), scorer.precision, scorer.device.type,
        nsfw.nsfw_prompts, nsfw.safe_prompts, int(batch_size),
    )


def score_index(
    scorer: ClipScorer,
    shards: ShardSet,
    index: pl.DataFrame,
    index_cfg: IndexConfig,
    batch_size: int = 256,
    nsfw: NsfwConfig | None = None,
    cache: ShardResultCache | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Score the rows of ``index`` (columns uid, shard, position, key, caption) shard by shard.

    With a ``cache``, each shard's result is saved as soon as it is finished, keyed by the
    scorer's fingerprint and the shard's rows, and a later call loads finished shards instead of
    scoring them again: a run killed mid-pool resumes where it stopped, with equal results.
    Returns the ``SCORE_FIELDS`` arrays in index order and counts of scored and resumed shards.
    """
    nsfw = nsfw or NsfwConfig()
    model_key = scorer_fingerprint(scorer, nsfw, batch_size) if cache is not None else ""
    parts: list[dict[str, np.ndarray]] = []
    counts = {"shards": 0, "scored_shards": 0, "resumed_shards": 0}
    bar = tqdm(total=index.height, desc="score pool", unit="sample", disable=not progress)
    for group in index.partition_by("shard", maintain_order=True):
        shard = str(group["shard"][0])
        key = ""
        result = None
        if cache is not None:
            rows = rows_fingerprint(
                [group["uid"], group["position"], group["key"], group["caption"]]
            )
            key = f"clip_score/{model_key}/{shard}-{rows}"
            result = cache.load(key)
        if result is not None and len(result["uid"]) == group.height:
            counts["resumed_shards"] += 1
        else:
            records = (
                (row["uid"], image, row["caption"])
                for row, image in decode_selected(shards, group, index_cfg)
            )
            scored = score_shard(scorer, records, batch_size, nsfw, progress=False)
            result = {name: scored[name] for name in SCORE_FIELDS}
            if cache is not None:
                cache.save(key, result)
            counts["scored_shards"] += 1
        parts.append(result)
        counts["shards"] += 1
        bar.update(group.height)
    bar.close()
    if counts["resumed_shards"]:
        logger.info(
            "score pool: %d of %d shards resumed from %s, %d scored",
            counts["resumed_shards"], counts["shards"], cache, counts["scored_shards"],
        )
    return concat_score_parts(parts, scorer.embed_dim), counts


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


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or at hub import time."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:
        return "https://huggingface.co"


def _reachable(url: str, timeout: float) -> bool:
    """One HEAD request with a short timeout: any HTTP answer counts as reachable, no retries."""
    parts = urlsplit(url)
    root = f"{parts.scheme}://{parts.netloc}/"
    try:
        with urllib.request.urlopen(urllib.request.Request(root, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _hub_cached(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _unavailable(model_name: str, what: str, url: str, reason: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load CLIP model {model_name!r}: {what} is not in the local cache and {reason}. "
        "Download it on a connected machine (e.g. `hf download <repo>`) and copy the cache "
        "over, or load a local copy instead: model_name=<open_clip architecture> with "
        "pretrained='/path/to/open_clip_model.safetensors', or "
        "model_name='local-dir:/path/to/folder' holding open_clip_config.json and the weights "
        f"(source: {url})."
    )


def _ensure_fetchable(model_name: str, what: str, url: str, timeout: float) -> None:
    """Fail at once when ``url`` would have to be downloaded but cannot be."""
    if _hub_offline():
        raise _unavailable(model_name, what, url, "HF_HUB_OFFLINE is set (offline mode)")
    if not _reachable(url, timeout):
        raise _unavailable(
            model_name, what, url, f"{urlsplit(url).netloc} cannot be reached (machine offline?)"
        )


def _tokenizer_from_cfg(model_cfg: Mapping[str, Any]) -> Any:
    """The tokenizer an open_clip model config asks for (SimpleTokenizer unless an HF one is named)."""
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    context_length = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(
            text_cfg["hf_tokenizer_name"],
            context_length=context_length,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **kwargs,
        )
    return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)


def _preprocess_from_cfg(preprocess_cfg: Mapping[str, Any]) -> Any:
    keys = {f.name for f in fields(PreprocessCfg)}
    values = {k: v for k, v in preprocess_cfg.items() if k in keys}
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(values[key])
    return image_transform_v2(PreprocessCfg(**values), is_train=False)


def _model_from_checkpoint(
    checkpoint: Mapping[str, Any], device: torch.device, precision: str
) -> tuple[torch.nn.Module, Any, Any, str]:
    config = checkpoint.get("config")
    if not isinstance(config, Mapping) or "model_cfg" not in config or "state_dict" not in checkpoint:
        raise ValueError(
            "checkpoint must be a dict {'config': {'model_cfg': ...}, 'state_dict': ...} as "
            "train_filter_network returns and AIMCheckpointDataset loads"
        )
    model_cfg = dict(config["model_cfg"])
    model_cfg["vision_cfg"] = dict(model_cfg.get("vision_cfg", {}))
    model_cfg["text_cfg"] = dict(model_cfg.get("text_cfg", {}))
    if "timm_model_name" in model_cfg["vision_cfg"]:
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    hf_text = "hf_model_name" in model_cfg["text_cfg"]
    if hf_text:
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
    custom_text = bool(model_cfg.pop("custom_text", False)) or hf_text
    if custom_text:
        model_class = open_clip.CoCa if "multimodal_cfg" in model_cfg else open_clip.CustomTextCLIP
    else:
        model_class = open_clip.CLIP
    model = model_class(**model_cfg, cast_dtype=open_clip.get_cast_dtype(precision))
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model.to(device)
    if precision != "fp32":
        open_clip.convert_weights_to_lp(
            model, torch.float16 if precision == "fp16" else torch.bfloat16
        )
    image_size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess_cfg = dict(config.get("preprocess_cfg") or {"size": image_size})
    preprocess_cfg.setdefault("size", image_size)
    open_clip.set_model_preprocess_cfg(
        model,
        {
            "mean": open_clip.OPENAI_DATASET_MEAN,
            "std": open_clip.OPENAI_DATASET_STD,
            **preprocess_cfg,
        },
    )
    name = str(config.get("model_name", "custom"))
    return model, _preprocess_from_cfg(preprocess_cfg), _tokenizer_from_cfg(model_cfg), name


@dataclass(frozen=True)
class OpenClipSource:
    """Where an open_clip model comes from, resolved (and checked) without loading weights:
    the name and ``pretrained`` to build it with, and where its tokenizer comes from."""

    create_name: str
    pretrained: str | None = None
    force_preprocess: Mapping[str, Any] | None = None
    tokenizer: str = "name"  # name: open_clip.get_tokenizer(create_name) | config: from its cfg


def resolve_open_clip_source(
    model_name: str,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    timeout: float = HUB_PROBE_TIMEOUT_S,
) -> OpenClipSource:
    """Resolve an open_clip name + ``pretrained`` to local files or a download that can happen.

    Raises at once, loading nothing: ``FileNotFoundError`` for a missing local folder or file,
    ``ValueError`` for an unknown architecture, ``ModelUnavailableError`` when weights must be
    downloaded but the machine is offline. A run calls this before any work starts.
    """
    if model_name.startswith("local-dir:"):
        folder = model_name[len("local-dir:") :]
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"model_name={model_name!r}: no such folder {folder!r}")
        return OpenClipSource(model_name)

    if model_name.startswith("hf-hub:"):
        repo_id = model_name[len("hf-hub:") :]
        config_path = _hub_cached(repo_id, HF_CONFIG_NAME, cache_dir)
        weights = [_hub_cached(repo_id, name, cache_dir) for name in HF_WEIGHT_NAMES]
        weights_path = next((w for w in weights if w), None)
        if config_path and weights_path and os.path.dirname(config_path) == os.path.dirname(
            weights_path
        ):
            return OpenClipSource("local-dir:" + os.path.dirname(config_path), tokenizer="config")
        _ensure_fetchable(
            model_name, f"Hugging Face repo {repo_id!r}", f"{_hub_endpoint()}/{repo_id}", timeout
        )
        return OpenClipSource(model_name)

    if open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"model_name={model_name!r} is not an open_clip architecture (see "
            "open_clip.list_models()), an 'hf-hub:org/repo' name or a 'local-dir:/path' folder"
        )
    if pretrained is None:
        return OpenClipSource(model_name)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        if not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise FileNotFoundError(
                f"pretrained={pretrained!r}: no such checkpoint file, and not an open_clip tag "
                f"of {model_name!r} (tags: {tags})"
            )
        return OpenClipSource(model_name, pretrained)

    preprocess_keys = {f.name for f in fields(PreprocessCfg)}
    force_preprocess = {k: v for k, v in tag_cfg.items() if k in preprocess_keys}
    hub = tag_cfg.get("hf_hub", "")
    cached: str | None = None
    if hub:
        repo_id, filename = os.path.split(hub)
        names = (filename,) if filename else HF_WEIGHT_NAMES
        if filename.endswith((".bin", ".pth", ".pt")):
            names = (os.path.splitext(filename)[0] + ".safetensors", filename)
        cached = next((p for p in (_hub_cached(repo_id, n, cache_dir) for n in names) if p), None)
        what, url = f"Hugging Face repo {repo_id!r}", f"{_hub_endpoint()}/{repo_id}"
    else:
        url = tag_cfg.get("url", "")
        target = os.path.join(
            cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url)
        )
        cached = target if os.path.isfile(target) else None
        what = f"weights file {os.path.basename(url)!r}"
    if cached:
        return OpenClipSource(model_name, cached, force_preprocess)
    _ensure_fetchable(f"{model_name}/{pretrained}", what, url, timeout)
    return OpenClipSource(model_name, pretrained)


def _model_from_open_clip(
    model_name: str,
    pretrained: str | None,
    device: torch.device,
    precision: str,
    cache_dir: str | None,
    timeout: float,
) -> tuple[torch.nn.Module, Any, Any]:
    source = resolve_open_clip_source(model_name, pretrained, cache_dir, timeout)
    if source.pretrained is None and not source.create_name.startswith(("hf-hub:", "local-dir:")):
        logger.warning("CLIP model %s has no pretrained weights: scores are random", model_name)
    create: dict[str, Any] = {"device": device, "precision": precision, "cache_dir": cache_dir}
    if source.force_preprocess:
        create["force_preprocess_cfg"] = dict(source.force_preprocess)
    model, _, preprocess = open_clip.create_model_and_transforms(
        source.create_name, pretrained=source.pretrained, **create
    )
    if source.tokenizer == "config":
        tokenizer = _tokenizer_from_cfg(open_clip.get_model_config(source.create_name) or {})
    else:
        tokenizer = open_clip.get_tokenizer(source.create_name, cache_dir=cache_dir)
    return model, preprocess, tokenizer


def load_clip_model(
    model_name: str,
    pretrained: str | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 256,
    cache_dir: str | None = None,
    hub_timeout_s: float = HUB_PROBE_TIMEOUT_S,
) -> ClipScorer:
    """Build a ``ClipScorer`` from open_clip names/tags/paths or a ``train_filter_network`` dict.

    ``model_name`` is an open_clip architecture (``ViT-L-14``) with ``pretrained`` a tag
    (``dfn2b``) or checkpoint file, or an ``hf-hub:org/repo`` / ``local-dir:/path`` name. With
    ``checkpoint`` the model is built from ``checkpoint["config"]["model_cfg"]`` instead and
    ``model_name`` only labels it. A model that needs a download while offline raises
    ``ModelUnavailableError`` at once; a missing local path raises ``FileNotFoundError``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolved = resolve_device(device)
    if precision == "fp16" and resolved.type == "cpu":
        logger.warning("precision='fp16' on CPU is slow and may be unsupported; prefer fp32")
    if checkpoint is not None:
        if pretrained is not None:
            raise ValueError("give either pretrained or checkpoint, not both")
        model, preprocess, tokenizer, saved_name = _model_from_checkpoint(
            checkpoint, resolved, precision
        )
        name = model_name or saved_name
    else:
        if not model_name:
            raise ValueError("model_name is required unless a checkpoint dict is given")
        model, preprocess, tokenizer = _model_from_open_clip(
            model_name, pretrained, resolved, precision, cache_dir, hub_timeout_s
        )
        name = model_name if pretrained is None else f"{model_name}/{pretrained}"
    scorer = ClipScorer(model, preprocess, tokenizer, resolved, precision, name, batch_size)
    logger.info("loaded %r", scorer)
    return scorer
