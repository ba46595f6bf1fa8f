"""The one webdataset shard reader and writer (img2dataset layout), local or any fsspec URL.

A sample is a dict ``{"__key__": str, "<ext>": bytes | str | dict, ...}``. On disk each sample is
a run of tar members ``{key}.{ext}`` next to each other, which the ``webdataset`` package reads
unchanged. Reading never loads a whole shard or pool in memory, and a damaged tar yields what it
can plus an error record instead of raising.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

Sample = dict[str, Any]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
ERROR_KEY = "__error__"
SHARD_KEY = "__shard__"


def _encode(value: Any) -> bytes:
    """Turn a sample field into the bytes of its tar member."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict | list | int | float | bool) or value is None:
        return json.dumps(value, sort_keys=True).encode("utf-8")
    raise TypeError(f"cannot write a field of type {type(value).__name__} to a shard")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name=name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(samples: Iterable[Sample], path: str, fs: fsspec.AbstractFileSystem | None = None) -> int:
    """Write samples into one tar shard at ``path``; return how many were written."""
    fs = fs or fsspec.filesystem("file")
    count = 0
    mtime = time.time()
    with fs.open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = str(sample["__key__"])
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                _add_member(tar, f"{key}.{ext}", _encode(value), mtime)
            count += 1
    return count


def write_shards(
    samples: Iterable[Sample],
    out_dir: str,
    samples_per_shard: int = 10_000,
    prefix: str = "shard",
    fs: fsspec.AbstractFileSystem | None = None,
) -> list[str]:
    """Stream samples into ``{prefix}-000000.tar``, ``-000001.tar``, ... under ``out_dir``.

    Only one shard's samples are held at a time. Returns the written shard paths.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if fs is None:
        fs, out_dir = fsspec.core.url_to_fs(str(out_dir))
    fs.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    batch: list[Sample] = []

    def flush() -> None:
        path = posixpath.join(out_dir, f"{prefix}-{len(paths):06d}.tar")
        write_shard(batch, path, fs)
        paths.append(path)
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) >= samples_per_shard:
            flush()
    if batch or not paths:
        flush()
    return paths


def _split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.0.jpg`` -> (``dir/abc``, ``0.jpg``): the key is up to the first dot of the basename."""
    dirname, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(dirname, stem) if dirname else stem, ext.lower()


def read_shard(path: str, fs: fsspec.AbstractFileSystem | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard in order, as raw bytes per extension.

    Each sample carries ``__shard__`` (the shard's file name). A member whose key repeats a key
    already seen in this shard starts a new sample with ``__error__ = "duplicate_key"``. A tar
    that breaks off yields the samples read so far, then one record with
    ``__error__ = "truncated_tar: ..."``.
    """
    if fs is None:
        fs, path = fsspec.core.url_to_fs(str(path))
    shard_name = posixpath.basename(path)
    seen: set[str] = set()
    current: Sample | None = None
    try:
        size = fs.size(path) if path.endswith(".tar") else None
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member_name(member.name)
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if current is not None and current["__key__"] == key and ext not in current:
                    current[ext] = data
                    continue
                if current is not None:
                    yield current
                current = {"__key__": key, SHARD_KEY: shard_name, ext: data}
                if key in seen:
                    current[ERROR_KEY] = "duplicate_key"
                seen.add(key)
            if size is not None and size - tar.offset < 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset} of {size}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if current is not None:
            yield current
            current = None
        logger.warning("shard %s is damaged: %s", path, exc)
        yield {
            "__key__": f"{shard_name}#truncated",
            SHARD_KEY: shard_name,
            ERROR_KEY: f"truncated_tar: {exc}",
        }
    if current is not None:
        yield current


def list_shards(path: str) -> list[str]:
    """The ``*.tar`` shards under a folder (local path or fsspec URL), sorted by name."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root):
        raise FileNotFoundError(f"shard folder {path} does not exist")
    found = sorted(p for p in fs.find(root) if p.endswith(".tar"))
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    if protocol in ("file", "local"):
        return found
    return [f"{protocol}://{p}" for p in found]


@dataclass
class ShardSet:
    """A lazy handle on a folder of shards: lists them, iterates samples one shard at a time."""

    path: str
    shards: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: str) -> ShardSet:
        """Open the shard folder at ``path`` (local or fsspec URL)."""
        return cls(path=str(path), shards=list_shards(path))

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shards:
            yield from read_shard(shard)

    def iter_shard(self, shard: str) -> Iterator[Sample]:
        """Samples of one shard (a path from ``self.shards``)."""
        return read_shard(shard)

    def count(self) -> int:
        """Number of samples, by reading every shard (cheap for the sample, costly at scale)."""
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"ShardSet(path={self.path!r}, shards={len(self.shards)})"


def sample_text(sample: Sample, ext: str = "txt") -> str | None:
    """The sample's caption as text, or None when it is missing or not valid UTF-8."""
    value = sample.get(ext)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def sample_json(sample: Sample) -> dict[str, Any]:
    """The sample's ``.json`` metadata as a dict ({} when missing or not valid JSON)."""
    value = sample.get("json")
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(bytes(value).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def image_bytes(sample: Sample) -> tuple[str, bytes] | None:
    """The first image member of a sample as ``(extension, bytes)``, or None when there is none."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext, bytes(sample[ext])
    return None
