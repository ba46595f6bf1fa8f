"""The one uid rule: a sample's ``.json`` ``uid`` when it has one, else a digest of where it lies.

DataComp and img2dataset write a ``uid`` into each sample's ``.json``; a pool without one gets a
deterministic uid from its shard and key, so every stage (index, scoring, the pre-training
hold-out split) names a sample the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any

from aim_kedro.io.shards import SHARD_KEY, Sample, sample_json


def default_uid(shard: str, key: str) -> str:
    """Deterministic uid of a sample without one: sha256 of ``shard/key``, 32 hex characters."""
    return hashlib.sha256(f"{shard}/{key}".encode()).hexdigest()[:32]


def declared_uid(meta: dict[str, Any]) -> str | None:
    """The uid a sample's ``.json`` declares (a non-empty string or an integer), else None."""
    raw = meta.get("uid")
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        return None
    text = str(raw)
    return text or None


def sample_uid(sample: Sample, shard: str | None = None) -> str:
    """The sample's uid: its ``.json`` ``uid``, else ``default_uid(shard, key)`` (the shard is
    the sample's ``__shard__`` unless given)."""
    uid = declared_uid(sample_json(sample))
    if uid is not None:
        return uid
    where = shard if shard is not None else str(sample.get(SHARD_KEY, ""))
    return default_uid(where, str(sample.get("__key__", "")))


__all__ = ["declared_uid", "default_uid", "sample_uid"]
