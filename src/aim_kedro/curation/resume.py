"""Per-shard results of a long stage, saved as each shard finishes, so a killed run resumes.

A web-scale scoring pass takes days; a process killed half-way must not start over. Each
finished shard's arrays go to ``{root}/{key}.npz`` (written to a temporary name, then renamed, so
a kill mid-write leaves no entry a later run would read). Keys carry fingerprints of everything
the result depends on (the model, the shard's rows), so a changed input never reuses a stale
entry. Local paths and fsspec URLs both work.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import numpy as np
import torch

logger = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A 16-hex-character digest of JSON-able parts (tuples/lists, dicts, strings, numbers)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensors_fingerprint(state_dict: Mapping[str, Any]) -> str:
    """A digest of a state dict's tensor names, shapes, dtypes and bytes (weights identity)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tuple(value.shape)}{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def rows_fingerprint(columns: Iterable[Iterable[Any]]) -> str:
    """A digest of table columns (e.g. a shard's uids and byte hashes), order included."""
    digest = hashlib.sha256()
    for column in columns:
        for value in column:
            digest.update(repr(value).encode())
            digest.update(b"\x00")
        digest.update(b"\x01")
    return digest.hexdigest()[:16]


class ShardResultCache:
    """A folder of ``{key}.npz`` results, one per finished shard (local path or fsspec URL)."""

    def __init__(self, root: str, fs_args: Mapping[str, Any] | None = None) -> None:
        self.root = str(root)
        self._fs, self._path = fsspec.core.url_to_fs(self.root, **dict(fs_args or {}))

    def _file(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"cache key {key!r} must be a relative path without '..'")
        return posixpath.join(self._path, f"{key}.npz")

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays saved under ``key``, or None when there is no finished entry."""
        path = self._file(key)
        if not self._fs.exists(path):
            return None
        try:
            with self._fs.open(path, "rb") as handle, np.load(io.BytesIO(handle.read())) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            logger.warning("cache entry %s cannot be read (%s): it is recomputed", path, exc)
            return None

    def save(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Write ``arrays`` under ``key``: to a temporary file first, then renamed into place."""
        path = self._file(key)
        buffer = io.BytesIO()
        np.savez(buffer, **{name: _storable(value) for name, value in arrays.items()})
        self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{os.getpid()}-{uuid.uuid4().hex}.npz")
        try:
            with self._fs.open(tmp, "wb") as handle:
                handle.write(buffer.getvalue())
            self._fs.mv(tmp, path)
        except BaseException:
            if self._fs.exists(tmp):  # a full disk leaves no partial entry behind
                self._fs.rm(tmp)
            raise

    def keys(self, prefix: str = "") -> list[str]:
        """Finished entries under ``prefix`` (relative keys, sorted)."""
        base = posixpath.join(self._path, prefix) if prefix else self._path
        if not self._fs.exists(base):
            return []
        found = [p for p in self._fs.find(base) if p.endswith(".npz")]
        names = [posixpath.relpath(p, self._path)[: -len(".npz")] for p in found]
        return sorted(n for n in names if not posixpath.basename(n).startswith(".tmp-"))

    def __repr__(self) -> str:
        return f"ShardResultCache(root={self.root!r})"


def _storable(value: np.ndarray) -> np.ndarray:
    """Object arrays of strings become unicode arrays, so entries load without pickle."""
    array = np.asarray(value)
    if array.dtype == object:
        return array.astype(str)
    return array


__all__ = ["ShardResultCache", "fingerprint", "rows_fingerprint", "tensors_fingerprint"]
