"""Where shards live, and how their bytes arrive: folders, URLs, brace ranges, ``pipe:`` commands.

A shard spec is one of, or a list of several:

- a folder (local path or any fsspec URL: ``s3://``, ``gs://``, ``http(s)://``, ``memory://``),
  searched for ``*.tar`` at any depth, or one ``.tar`` file;
- a webdataset brace range, ``https://host/pool/{00000..00099}.tar`` (``{a,b}`` lists too);
- a ``pipe:`` command whose standard output is a tar (``pipe:aws s3 cp s3://b/{0..9}.tar -``).

Every shard gets an id: its path relative to its root (the folder, or the part of a brace range
before the first brace), so ``run1/00000.tar`` and ``run2/00000.tar`` under one root stay apart.
With several roots, ids are relative to the deepest folder the roots share. Bytes are fetched
through ``open_stream``: HTTP as one streamed GET (a plain static server answers no range
requests), a failure of the transfer itself (connection dropped, 503, command failed) raised as
``TransportError`` so the reader can retry it with backoff (``ReadRetry``).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

logger = logging.getLogger(__name__)

PIPE = "pipe:"
LOCAL_PROTOCOLS = ("file", "local")
HTTP_PROTOCOLS = ("http", "https")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
T = TypeVar("T")


class TransportError(Exception):
    """Fetching a shard's bytes failed (not its content): worth another try."""

    def __init__(self, location: str, cause: BaseException | str) -> None:
        self.location = location
        self.cause = cause if isinstance(cause, str) else describe_error(cause)
        super().__init__(f"{location}: {self.cause}")


class UnreadableShardError(Exception):
    """A shard stayed unreadable after every retry; ``cause`` is the last failure."""

    def __init__(self, shard: str, location: str, cause: str, attempts: int) -> None:
        self.shard, self.location, self.cause, self.attempts = shard, location, cause, attempts
        super().__init__(f"shard {shard} ({location}) unreadable after {attempts} attempt(s): {cause}")


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an error and of the errors it was raised from (fsspec hides an HTTP
    503 inside a FileNotFoundError)."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = str(current).strip()
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


@dataclass(frozen=True)
class ReadRetry:
    """How often a failed transfer is tried again (``retries``), waiting ``backoff_s`` x 2^k
    seconds before try k+1 (``curation.index.read_retries`` / ``read_backoff_s``)."""

    retries: int = 0
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"read retries must be an integer >= 0, got {self.retries!r}")
        if isinstance(self.backoff_s, bool) or not isinstance(self.backoff_s, int | float) \
                or self.backoff_s < 0:
            raise ValueError(f"read backoff must be seconds >= 0, got {self.backoff_s!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(self.backoff_s) * 2 ** (attempt - 1)


def with_retries(fetch: Callable[[], T], retry: ReadRetry, shard: str, location: str) -> T:
    """``fetch()``, tried again after each ``TransportError`` as ``retry`` says; raises
    ``UnreadableShardError`` with the last cause when every try failed."""
    attempt = 0
    while True:
        try:
            return fetch()
        except TransportError as exc:
            attempt += 1
            if attempt > retry.retries:
                raise UnreadableShardError(shard, location, exc.cause, attempt) from exc
            wait = retry.delay(attempt)
            logger.warning("reading %s failed (%s); try %d of %d in %.1f s", location, exc.cause,
                           attempt + 1, retry.retries + 1, wait)
            time.sleep(wait)


def expand_braces(text: str) -> list[str]:
    """Webdataset's brace expansion: ``{000..012}`` (zero-padded like its first bound) and
    ``{a,b}``, left to right, nested braces included; other text is kept as is."""
    start = text.find("{")
    if start < 0:
        return [text]
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced brace in shard spec {text!r}")
    head, inner, tail = text[:start], text[start + 1 : end], text[end + 1 :]
    match = _RANGE.match(inner)
    if match:
        lo_text, hi_text = match.groups()
        lo, hi = int(lo_text), int(hi_text)
        width = max(len(lo_text), len(hi_text)) if lo_text.startswith("0") or hi_text.startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    else:
        options = _split_top_level(inner)
        if len(options) == 1:
            return [head + "{" + x + "}" + t for x in expand_braces(inner) for t in expand_braces(tail)]
    return [head + x + t for option in options for x in expand_braces(option) for t in expand_braces(tail)]


def _split_top_level(inner: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in inner:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    return parts


def protocol_of(location: str) -> str:
    """The fsspec protocol of a location (``file`` for a local path, ``pipe`` for a command)."""
    if location.startswith(PIPE):
        return "pipe"
    if "://" in location:
        return location.split("://", 1)[0].lower()
    return "file"


def filesystem(location: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with the catalog's credentials / fs_args; a missing fsspec
    backend (s3fs, gcsfs) fails naming the package to install."""
    try:
        return fsspec.core.url_to_fs(location, **dict(storage_options or {}))
    except ImportError as exc:
        raise ImportError(f"cannot open {location}: {exc}") from exc


def full_location(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path that fsspec returned, as a location to open again (the protocol once, local plain)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if any(p in LOCAL_PROTOCOLS for p in protocols):
        return path
    if "://" in path:
        return path
    return f"{protocols[0]}://{path.lstrip('/') if protocols[0] != 'memory' else path}"


def _relative(root: str, location: str) -> str:
    base = root.rstrip("/") + "/"
    return location[len(base):] if location.startswith(base) else posixpath.basename(location)


def _pipe_path(command: str) -> str | None:
    """The shard path a ``pipe:`` command names: its last argument that ends in ``.tar``."""
    try:
        words = shlex.split(command[len(PIPE):])
    except ValueError:
        words = command[len(PIPE):].split()
    found = [w for w in words if w.endswith(".tar")]
    return found[-1] if found else None


def _strip_protocol(location: str) -> str:
    return location.split("://", 1)[1] if "://" in location else location


def _folder_shards(spec: str, storage_options: Mapping[str, Any] | None) -> tuple[str, list[str]]:
    """``(root, shard locations)`` of a folder (or one ``.tar``), sorted by location."""
    fs, path = filesystem(spec, storage_options)
    root = full_location(fs, path.rstrip("/") or path)
    try:
        if protocol_of(spec) in HTTP_PROTOCOLS:
            try:  # an unreachable server fails here with its cause; a 404 is an absent folder
                fs.cat_file(path, start=0, end=1)
            except FileNotFoundError:
                raise FileNotFoundError(f"shard folder {spec} does not exist") from None
        if not fs.exists(path):
            raise FileNotFoundError(f"shard folder {spec} does not exist")
        if path.endswith(".tar") and fs.isfile(path):
            return posixpath.dirname(root), [full_location(fs, path)]
        found = fs.find(path)
    except FileNotFoundError as exc:
        if exc.__cause__ is None and "does not exist" in str(exc):
            raise
        raise FileNotFoundError(f"cannot list shards under {spec}: {describe_error(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - any backend failure is reported with its cause
        raise OSError(f"cannot list shards under {spec}: {describe_error(exc)}") from exc
    return root, sorted(full_location(fs, p) for p in found if p.endswith(".tar"))


def _common_folder(paths: Sequence[str]) -> str:
    split = [p.rstrip("/").split("/") for p in paths]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common)


def resolve_one(spec: str, storage_options: Mapping[str, Any] | None = None
                ) -> tuple[str, list[str], list[str]]:
    """``(root, locations, ids)`` of one spec (folder, brace range, ``pipe:``), ids relative to
    the root. A folder that cannot be reached raises with the real cause."""
    spec = str(spec)
    if spec.startswith(PIPE):
        commands = expand_braces(spec)
        paths = [_pipe_path(c) for c in commands]
        if all(paths) and len(set(paths)) == len(paths):
            root = _common_folder([posixpath.dirname(str(p)) for p in paths])
            return root, commands, [_relative(root, str(p)) for p in paths]
        return "", commands, [c[len(PIPE):].strip() for c in commands]
    if "{" in spec:
        root = posixpath.dirname(spec[: spec.index("{")])
        locations = expand_braces(spec)
        first = locations[0]
        fs, path = filesystem(first, storage_options)
        try:
            fs.info(path)
        except Exception as exc:  # noqa: BLE001 - the real cause, before any work
            raise FileNotFoundError(
                f"the first shard {first} of {spec} cannot be read: {describe_error(exc)}"
            ) from exc
        return root, locations, [_relative(root, loc) for loc in locations]
    root, locations = _folder_shards(spec, storage_options)
    return root, locations, [_relative(root, loc) for loc in locations]


def resolve(spec: str | Sequence[str], storage_options: Mapping[str, Any] | None = None
            ) -> tuple[list[str], list[str]]:
    """``(locations, ids)`` of every shard a spec or a list of specs names, in order. With
    several specs, ids are relative to the deepest folder their roots share (the root path
    itself where they share none). Raises ValueError when two specs name one shard."""
    specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    if not specs:
        raise ValueError("a shard spec list must name at least one folder, range or command")
    resolved = [resolve_one(s, storage_options) for s in specs]
    if len(resolved) == 1:
        _, locations, ids = resolved[0]
        return locations, ids
    roots = [f"{protocol_of(r) if r else 'pipe'}/{_strip_protocol(r)}".rstrip("/")
             for r, _, _ in resolved]
    common = _common_folder(roots)
    locations, ids = [], []
    for root, (_, locs, rel) in zip(roots, resolved, strict=True):
        prefix = (root[len(common):] if common else root.split("/", 1)[-1]).strip("/")
        locations += locs
        ids += [posixpath.join(prefix, r) if prefix else r for r in rel]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"shard specs {specs} name the same shard twice: {repeated[:3]}")
    return locations, ids


class _Counted:
    """A read-only binary stream that counts bytes and turns read failures into TransportError."""

    def __init__(self, raw: Any, location: str) -> None:
        self.raw, self.location, self.bytes_read = raw, location, 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except Exception as exc:  # noqa: BLE001 - a transfer failure, whatever the backend
            raise TransportError(self.location, exc) from exc
        self.bytes_read += len(data)
        return data


@dataclass
class Stream:
    """An open shard: ``file`` to read, ``size`` when known, and ``short()``: why the transfer
    ended early (fewer bytes than announced, a command that failed), or None."""

    file: _Counted
    size: int | None
    finish: Callable[[], str | None]

    def short(self) -> str | None:
        """Why the bytes read are not the whole shard, or None when the transfer completed."""
        if self.size is not None and self.file.bytes_read < self.size:
            return f"transfer ended after {self.file.bytes_read} of {self.size} bytes"
        return self.finish()


@contextlib.contextmanager
def open_stream(location: str, storage_options: Mapping[str, Any] | None = None,
                fs: fsspec.AbstractFileSystem | None = None) -> Iterator[Stream]:
    """Open a shard for one sequential read. Opening failures raise ``TransportError``."""
    if location.startswith(PIPE):
        with _open_pipe(location) as stream:
            yield stream
        return
    try:
        if fs is None:
            fs, path = filesystem(location, storage_options)
        else:
            path = location
        size = fs.size(path)
        kwargs: dict[str, Any] = {"block_size": 0, "size": size} \
            if protocol_of(location) in HTTP_PROTOCOLS else {}
        raw = fs.open(path, "rb", **kwargs)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - cannot reach the shard: a transfer failure
        raise TransportError(location, exc) from exc
    try:
        yield Stream(_Counted(raw, location), int(size) if size is not None else None, lambda: None)
    finally:
        with contextlib.suppress(Exception):
            raw.close()


@contextlib.contextmanager
def _open_pipe(location: str) -> Iterator[Stream]:
    command = location[len(PIPE):]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)

        def finish() -> str | None:
            code = proc.wait()
            if code == 0:
                return None
            errors.seek(0)
            tail = errors.read()[-500:].decode("utf-8", "replace").strip()
            return f"command exited with status {code}" + (f": {tail}" if tail else "")

        try:
            yield Stream(_Counted(proc.stdout, location), None, finish)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def sidecar_location(location: str, suffix: str) -> str | None:
    """The file beside a shard with ``suffix`` instead of ``.tar`` (``00000.tar`` ->
    ``00000.parquet`` / ``00000_stats.json``); None for ``pipe:`` commands and non-tar names."""
    if location.startswith(PIPE) or not location.endswith(".tar"):
        return None
    return location[: -len(".tar")] + suffix


def fetch_optional(location: str, storage_options: Mapping[str, Any] | None = None) -> bytes | None:
    """The bytes of a small file, or None when it does not exist; other failures raise
    ``TransportError`` (a 503 is not an absent file)."""
    try:
        fs, path = filesystem(location, storage_options)
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        if exc.__cause__ is not None or exc.__context__ is not None:
            raise TransportError(location, exc) from exc
        return None
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure is the transfer's
        raise TransportError(location, exc) from exc


__all__ = [
    "PIPE",
    "ReadRetry",
    "Stream",
    "TransportError",
    "UnreadableShardError",
    "describe_error",
    "expand_braces",
    "fetch_optional",
    "filesystem",
    "full_location",
    "open_stream",
    "protocol_of",
    "resolve",
    "resolve_one",
    "sidecar_location",
    "with_retries",
]
