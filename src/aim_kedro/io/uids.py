"""The one uid rule: a sample's ``.json`` ``uid`` when it has one, else a digest of where it lies;
and DataComp's uid lists (``.npy`` of 128-bit uids), read and written.

DataComp writes a ``uid`` into each sample's ``.json`` (img2dataset does with
``--save_additional_columns '["uid"]'``); a pool without one gets a deterministic uid from its
shard id (the shard's path relative to the pool's root) and key, so two img2dataset runs under one
root never collide, and every stage (index, scoring, the pre-training hold-out split) names a
sample the same way. Both are 32 hex characters: DataComp's 128-bit format.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aim_kedro.io.shards import SHARD_KEY, Sample, sample_json
from aim_kedro.io.sources import fetch_optional

logger = logging.getLogger(__name__)

DATACOMP_UID_DTYPE = np.dtype("u8,u8")
"""DataComp's subset files: a sorted array of (upper, lower) 64-bit halves of each 128-bit uid."""

_HEX_UID = re.compile(r"^[0-9a-fA-F]{1,32}$")


def default_uid(shard: str, key: str) -> str:
    """Deterministic uid of a sample without one: sha256 of ``shard/key`` (``shard`` is the
    shard's id, its path relative to the pool's root), 32 hex characters."""
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


def is_hex_uid(uid: object) -> bool:
    """Whether ``uid`` is DataComp's kind: up to 32 hex characters (a 128-bit number)."""
    return isinstance(uid, str) and bool(_HEX_UID.match(uid))


def uid_halves(uid: str) -> tuple[int, int]:
    """The (upper, lower) 64-bit halves of a uid as DataComp stores it: a hex uid as its number
    (left-padded with zeros to 32 characters); any other uid (a pool that declares its own) as
    the first 128 bits of its sha256, so a uid list still round-trips through this project."""
    text = str(uid)
    number = text if is_hex_uid(text) else hashlib.sha256(text.encode()).hexdigest()[:32]
    return divmod(int(number, 16), 1 << 64)


def to_datacomp(uids: Iterable[str]) -> np.ndarray:
    """DataComp's uid-list array of ``uids``: sorted, unique, dtype ``u8,u8``, what its
    resharder reads (``np.save`` it as ``.npy``); non-hex uids as ``uid_halves`` says."""
    pairs = sorted({uid_halves(str(u)) for u in uids})
    return np.array(pairs, dtype=DATACOMP_UID_DTYPE) if pairs else np.zeros(0, DATACOMP_UID_DTYPE)


def export_uids(uids: Sequence[str]) -> np.ndarray:
    """``to_datacomp`` of ``uids``, warning when some are not 128-bit hex: those are stored as
    their sha256's first 128 bits, which only this project's uid_list matches, not DataComp's
    resharder."""
    other = [uid for uid in uids if not is_hex_uid(uid)]
    if other:
        logger.warning("export_dfn_uids: %d kept uids are not 128-bit hex (e.g. %r): stored as "
                       "their sha256's first 128 bits, which only this project's uid_list "
                       "matches, not DataComp's resharder", len(other), other[0])
    return to_datacomp(uids)


def from_datacomp(array: np.ndarray) -> list[str]:
    """The 32-hex-character uids of a DataComp uid-list array, in its order."""
    arr = _checked(array, "uid list")
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(arr["f0"], arr["f1"], strict=True)]


def _checked(array: Any, where: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.names is None or len(arr.dtype.names) != 2 or arr.ndim != 1 or any(
        arr.dtype[i] != np.dtype("u8") for i in range(2)
    ):
        raise ValueError(
            f"{where} is not a DataComp uid list: expected a 1-d array of dtype u8,u8 (two "
            f"uint64 per 128-bit uid), got dtype {arr.dtype} with shape {arr.shape}"
        )
    return arr.astype(DATACOMP_UID_DTYPE, copy=False)


class UidList:
    """A DataComp uid list to test membership against, without a set of millions of strings:
    the sorted ``u8,u8`` array and a binary search. Pickles (for Ray workers) as the array."""

    def __init__(self, array: np.ndarray, source: str = "uid list") -> None:
        arr = _checked(array, source)
        order = np.lexsort((arr["f1"], arr["f0"]))
        self.array = arr[order]
        self._upper = np.ascontiguousarray(self.array["f0"])
        self._lower = np.ascontiguousarray(self.array["f1"])
        self.source = source

    @classmethod
    def load(cls, location: str, storage_options: Mapping[str, Any] | None = None) -> UidList:
        """Read a ``.npy`` uid list (local path or fsspec URL). Raises FileNotFoundError when
        it is absent and ValueError when it is not DataComp's format, naming the file."""
        data = fetch_optional(str(location), storage_options)
        if data is None:
            raise FileNotFoundError(f"uid list {location} does not exist")
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"uid list {location} is not a .npy file: {exc}") from exc
        return cls(array, str(location))

    def __len__(self) -> int:
        return int(self.array.size)

    def __contains__(self, uid: object) -> bool:
        hi, lo = uid_halves(str(uid))
        upper = np.uint64(hi)
        start = int(np.searchsorted(self._upper, upper, "left"))
        stop = int(np.searchsorted(self._upper, upper, "right"))
        return bool(np.any(self._lower[start:stop] == np.uint64(lo)))

    def __repr__(self) -> str:
        return f"UidList({self.source!r}, {len(self)} uids)"


__all__ = [
    "DATACOMP_UID_DTYPE",
    "UidList",
    "declared_uid",
    "default_uid",
    "export_uids",
    "from_datacomp",
    "is_hex_uid",
    "sample_uid",
    "to_datacomp",
    "uid_halves",
]
