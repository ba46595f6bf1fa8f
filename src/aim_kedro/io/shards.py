"""The one webdataset shard reader and writer (img2dataset layout), wherever the shards live.

A sample is a dict ``{"__key__": str, "<ext>": bytes | str | dict, ...}``. On disk each sample is
a run of tar members ``{key}.{ext}`` next to each other, which the ``webdataset`` package reads
unchanged. Reading never loads a whole shard or pool in memory, and a damaged tar yields what it
can plus an error record instead of raising. Where shards are and how their bytes arrive (local,
fsspec URLs, brace ranges, ``pipe:``, retries) is ``aim_kedro.io.sources``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import posixpath
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from aim_kedro.io.sources import (
    ReadRetry,
    TransportError,
    UnreadableShardError,
    open_stream,
    resolve,
)

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


def _read_once(
    path: str, shard_name: str, skip: int, fs: fsspec.AbstractFileSystem | None,
    storage_options: Mapping[str, Any] | None,
) -> Iterator[Sample]:
    """One pass over a shard, yielding its samples from the ``skip``-th on. A damaged tar (the
    whole file was read) ends with a ``truncated_tar`` record; a failed transfer raises
    ``TransportError`` and yields no partial sample."""
    position = 0

    def fresh() -> bool:
        nonlocal position
        position += 1
        return position > skip

    seen: set[str] = set()
    current: Sample | None = None
    with open_stream(path, storage_options, fs) as stream:
        try:
            with tarfile.open(fileobj=stream.file, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member_name(member.name)
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if current is not None and current["__key__"] == key and ext not in current:
                        current[ext] = data
                        continue
                    if current is not None and fresh():
                        yield current
                    current = {"__key__": key, SHARD_KEY: shard_name, ext: data}
                    if key in seen:
                        current[ERROR_KEY] = "duplicate_key"
                    seen.add(key)
                offset = tar.offset
            while stream.file.read(1 << 16):
                pass  # the padding after the end marker: a complete transfer reads every byte
            short = stream.short()
            if short is not None:
                raise TransportError(path, short)
            if stream.size is not None and path.endswith(".tar") and \
                    stream.size - offset < 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker after byte {offset} of {stream.size}")
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            short = stream.short()
            if short is not None:
                raise TransportError(path, f"{short} ({exc})") from exc
            logger.warning("shard %s is damaged: %s", path, exc)
            if current is not None and fresh():
                yield current
            current = None
            if fresh():
                yield {
                    "__key__": f"{shard_name}#truncated",
                    SHARD_KEY: shard_name,
                    ERROR_KEY: f"truncated_tar: {exc}",
                }
    if current is not None and fresh():
        yield current


def read_shard(
    path: str,
    fs: fsspec.AbstractFileSystem | None = None,
    name: str | None = None,
    retry: ReadRetry | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Sample]:
    """Yield the samples of one shard (a local path, fsspec URL or ``pipe:`` command) in order,
    as raw bytes per extension.

    Each sample carries ``__shard__``: ``name`` (the shard's id in its ``ShardSet``), else the
    file name. A member whose key repeats a key already seen in this shard starts a new sample
    with ``__error__ = "duplicate_key"``. A tar that breaks off yields the samples read so far,
    then one record with ``__error__ = "truncated_tar: ..."``. A transfer that fails (connection
    dropped, HTTP 503, a command that exits non-zero) is tried again per ``retry``, going on
    after the samples already yielded; when every try failed, ``UnreadableShardError`` names
    the shard and the last cause.
    """
    shard_name = name or posixpath.basename(path)
    retry = retry or ReadRetry()
    done = 0
    attempt = 0
    while True:
        try:
            for sample in _read_once(path, shard_name, done, fs, storage_options):
                done += 1
                yield sample
            return
        except TransportError as exc:
            attempt += 1
            if attempt > retry.retries:
                raise UnreadableShardError(shard_name, path, exc.cause, attempt) from exc
            wait = retry.delay(attempt)
            logger.warning("reading %s failed after %d samples (%s); try %d of %d in %.1f s",
                           path, done, exc.cause, attempt + 1, retry.retries + 1, wait)
            time.sleep(wait)


def list_shards(path: str | Sequence[str], storage_options: Mapping[str, Any] | None = None
                ) -> list[str]:
    """The shard locations a spec names (a folder searched for ``*.tar``, a brace range, a
    ``pipe:`` command, or a list of these); see ``aim_kedro.io.sources``."""
    return resolve(path, storage_options)[0]


@dataclass
class ShardSet:
    """A lazy handle on a pool's shards: lists them, iterates samples one shard at a time.

    ``shards`` are locations to read, ``names`` their ids (path relative to the root, what the
    index stores in ``shard`` and derives uids from); ``retry`` applies to every read and
    ``storage_options`` are the filesystem's credentials / arguments.
    """

    path: str
    shards: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    retry: ReadRetry = field(default_factory=ReadRetry)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [posixpath.basename(str(s)) for s in self.shards]
        if len(self.names) != len(self.shards):
            raise ValueError(f"ShardSet has {len(self.shards)} shards but {len(self.names)} names")

    @classmethod
    def open(
        cls, path: str | Sequence[str], storage_options: Mapping[str, Any] | None = None,
        retry: ReadRetry | None = None,
    ) -> ShardSet:
        """Open the shards a spec names (folder, fsspec URL, brace range, ``pipe:``, or a list);
        an unreachable location raises with its cause."""
        locations, names = resolve(path, storage_options)
        label = path if isinstance(path, str) else " + ".join(str(p) for p in path)
        return cls(path=label, shards=locations, names=names, retry=retry or ReadRetry(),
                   storage_options=dict(storage_options or {}))

    def name_of(self, shard: str) -> str:
        """The id of a shard location of this set."""
        return self.names[self.shards.index(shard)]

    def one(self, index: int) -> ShardSet:
        """The set of only the ``index``-th shard (with this set's retry and options)."""
        return dataclasses.replace(self, shards=[self.shards[index]], names=[self.names[index]])

    def with_retry(self, retry: ReadRetry) -> ShardSet:
        """This set, read with ``retry``."""
        return dataclasses.replace(self, retry=retry)

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shards:
            yield from self.iter_shard(shard)

    def iter_shard(self, shard: str) -> Iterator[Sample]:
        """Samples of one shard (a location from ``self.shards``)."""
        return read_shard(shard, name=self.name_of(shard), retry=self.retry,
                          storage_options=self.storage_options)

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


def image_text_pairs(samples: Iterable[Sample]) -> Iterator[tuple[bytes, str]]:
    """The (image bytes, caption) of every readable sample with an image, in order; a missing
    caption is the empty string."""
    for sample in samples:
        if ERROR_KEY not in sample and (found := image_bytes(sample)) is not None:
            yield found[1], sample_text(sample) or ""
