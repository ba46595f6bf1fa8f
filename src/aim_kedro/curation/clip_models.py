"""Loading the CLIP that scores the pool: open_clip names, tags, local files, the Hub cache.

``load_clip_model`` builds a ``scoring.ClipScorer`` from an open_clip name + pretrained tag, an
``hf-hub:`` repo, a local checkpoint file or ``local-dir:`` folder, or the checkpoint dict of
``filter_network.train_filter_network``. ``resolve_open_clip_source`` says where a model comes
from without loading it, and a model that would have to be downloaded while the machine is
offline fails at once with a message saying how to point at a local copy instead.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from aim_kedro.curation.scoring import ClipScorer

logger = logging.getLogger(__name__)


PRECISIONS = ("fp32", "fp16", "bf16")
HF_CONFIG_NAME = "open_clip_config.json"
HF_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 3.0


class ModelUnavailableError(RuntimeError):
    """A CLIP model that must be downloaded cannot be: the machine is offline or the Hub blocked."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unavailable CUDA request raises ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA but none is available; use 'auto' or 'cpu'")
    return resolved


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
    num_threads: int | None = None,
) -> ClipScorer:
    """Build a ``ClipScorer`` from open_clip names/tags/paths or a ``train_filter_network`` dict.

    ``model_name`` is an open_clip architecture (``ViT-L-14``) with ``pretrained`` a tag
    (``dfn2b``) or checkpoint file, or an ``hf-hub:org/repo`` / ``local-dir:/path`` name. With
    ``checkpoint`` the model is built from ``checkpoint["config"]["model_cfg"]`` instead and
    ``model_name`` only labels it. A model that needs a download while offline raises
    ``ModelUnavailableError`` at once; a missing local path raises ``FileNotFoundError``.
    ``num_threads`` pins the scorer's torch threads (``scoring.ClipScorer``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
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
    scorer = ClipScorer(
        model, preprocess, tokenizer, resolved, precision, name, batch_size, num_threads
    )
    logger.info("loaded %r", scorer)
    return scorer


__all__ = [
    "HUB_PROBE_TIMEOUT_S",
    "PRECISIONS",
    "ModelUnavailableError",
    "OpenClipSource",
    "load_clip_model",
    "resolve_device",
    "resolve_open_clip_source",
]
