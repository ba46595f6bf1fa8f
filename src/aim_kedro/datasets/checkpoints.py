"""Kedro datasets for model checkpoints: safetensors weights plus a JSON config, versioned, and
a published checkpoint file (safetensors or .pth) read as a state dict."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import fsspec
import torch
from kedro.io import DatasetError
from kedro.io.core import get_protocol_and_path
from kedro_datasets._typing import JSONPreview
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aim_kedro.aim.state_dicts import STATE_DICT_SUFFIXES, read_state_dict, state_dict_from_bytes
from aim_kedro.datasets._folder import LOCAL_PROTOCOLS, VersionedFolderDataset
from aim_kedro.datasets._input_only import InputOnlyDataset

_STEP_FILE = re.compile(r"step_(\d+)\.safetensors$")


def _tensors_to_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


class AIMCheckpointDataset(VersionedFolderDataset):
    """``model.safetensors`` + ``config.json`` (+ ``metadata.json``) in one versioned folder.

    ``save({"config": dict, "state_dict": dict[str, Tensor], "metadata": dict})``; ``load()``
    returns the same shape of dict.
    """

    def _write(self, folder: str, data: dict[str, Any]) -> None:
        if "state_dict" not in data or "config" not in data:
            raise ValueError("AIMCheckpointDataset.save takes a dict with 'config' and 'state_dict'")
        self._fs.makedirs(folder, exist_ok=True)
        with self._fs.open(self._join(folder, "model.safetensors"), "wb") as f:
            f.write(_tensors_to_bytes(data["state_dict"]))
        with self._fs.open(self._join(folder, "config.json"), "w") as f:
            json.dump(data["config"], f, indent=2, sort_keys=True)
        with self._fs.open(self._join(folder, "metadata.json"), "w") as f:
            json.dump(data.get("metadata", {}), f, indent=2, sort_keys=True)

    def _read(self, folder: str) -> dict[str, Any]:
        with self._fs.open(self._join(folder, "model.safetensors"), "rb") as f:
            state_dict = st_load(f.read())
        with self._fs.open(self._join(folder, "config.json")) as f:
            config = json.load(f)
        metadata: dict[str, Any] = {}
        meta_path = self._join(folder, "metadata.json")
        if self._fs.exists(meta_path):
            with self._fs.open(meta_path) as f:
                metadata = json.load(f)
        return {"config": config, "state_dict": state_dict, "metadata": metadata}

    def preview(self) -> JSONPreview:
        """The checkpoint's config and metadata as JSON, for kedro-viz."""
        folder = self._url(self._get_load_path())
        with self._fs.open(self._join(folder, "config.json")) as f:
            config = json.load(f)
        meta_path = self._join(folder, "metadata.json")
        metadata: dict[str, Any] = {}
        if self._fs.exists(meta_path):
            with self._fs.open(meta_path) as f:
                metadata = json.load(f)
        return json.dumps({"config": config, "metadata": metadata}, indent=2)


class CheckpointSeriesDataset(VersionedFolderDataset):
    """The intermediate checkpoints of one run: ``step_XXXXXXXX.safetensors`` + ``config.json``.

    ``save({"config": dict, "checkpoints": {step: state_dict}})``; ``load()`` returns
    ``{"config": dict, "steps": [int], "load": Callable[[int], state_dict]}`` reading one step
    at a time, so a long series never sits in memory at once.
    """

    def _write(self, folder: str, data: dict[str, Any]) -> None:
        self._fs.makedirs(folder, exist_ok=True)
        with self._fs.open(self._join(folder, "config.json"), "w") as f:
            json.dump(data["config"], f, indent=2, sort_keys=True)
        for step, state_dict in data["checkpoints"].items():
            if callable(state_dict):
                state_dict = state_dict()
            with self._fs.open(self._join(folder, f"step_{int(step):08d}.safetensors"), "wb") as f:
                f.write(_tensors_to_bytes(state_dict))

    def _read(self, folder: str) -> dict[str, Any]:
        with self._fs.open(self._join(folder, "config.json")) as f:
            config = json.load(f)
        steps = sorted(
            int(m.group(1)) for p in self._fs.ls(folder, detail=False) if (m := _STEP_FILE.search(p))
        )
        fs = self._fs

        def load_step(step: int) -> dict[str, torch.Tensor]:
            with fs.open(self._join(folder, f"step_{int(step):08d}.safetensors"), "rb") as f:
                return st_load(f.read())

        loader: Callable[[int], dict[str, torch.Tensor]] = load_step
        return {"config": config, "steps": steps, "load": loader}

    def preview(self) -> JSONPreview:
        """The run's config and the list of saved steps, for kedro-viz."""
        data = self.load()
        return json.dumps({"config": data["config"], "steps": data["steps"]}, indent=2)


class StateDictDataset(InputOnlyDataset):
    """A read-only checkpoint file (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
    ``torch.load(weights_only=True)``) loaded as a state dict, e.g. the published AIM v1 weights.

    Example catalog entry (conf/local/catalog.yml)::

        ml_aim_checkpoint:
          type: aim_kedro.datasets.StateDictDataset
          filepath: /models/apple-aim-600M/model.safetensors
    """

    SAVE_REFUSAL = "a read-only checkpoint file"

    def __init__(self, *, filepath: str, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._protocol, path = get_protocol_and_path(filepath)
        self._path = str(path)
        suffix = PurePosixPath(self._path).suffix
        if suffix not in STATE_DICT_SUFFIXES:
            raise DatasetError(f"{filepath}: a state dict file ends in one of {STATE_DICT_SUFFIXES}")
        self._fs = fsspec.filesystem(self._protocol, **(credentials or {}), **(fs_args or {}))
        self.metadata = metadata

    def _local(self) -> bool:
        return self._protocol in LOCAL_PROTOCOLS

    def load(self) -> dict[str, torch.Tensor]:
        """The tensors (memory-mapped when a local safetensors file)."""
        if self._local():
            return read_state_dict(self._path)
        with self._fs.open(self._path, "rb") as f:
            return state_dict_from_bytes(f.read(), PurePosixPath(self._path).suffix)


    def _exists(self) -> bool:
        return self._fs.isfile(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._path, "protocol": self._protocol}

    def preview(self) -> JSONPreview:
        """Tensor count, parameter count and the first tensor shapes, for kedro-viz."""
        if self._local() and self._path.endswith(".safetensors"):
            with safe_open(self._path, framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            shapes = {k: list(v.shape) for k, v in self.load().items()}
        params = sum(int(torch.Size(s).numel()) for s in shapes.values())
        first = dict(list(shapes.items())[:12])
        return JSONPreview(json.dumps({"tensors": len(shapes), "parameters": params,
                                       "shapes": first}, indent=2))
