"""Kedro dataset for webdataset shards (img2dataset layout): a versioned folder, or any shard spec."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, DatasetError
from kedro_datasets._typing import TablePreview

from aim_kedro.datasets._folder import VersionedFolderDataset
from aim_kedro.io.shards import (
    IMAGE_EXTENSIONS,
    Sample,
    ShardSet,
    image_bytes,
    sample_json,
    sample_text,
    write_shards,
)
from aim_kedro.io.sources import PIPE, describe_error


def is_shard_spec(filepath: str | Sequence[str]) -> bool:
    """True for what only reads: a list of roots, a brace range or a ``pipe:`` command."""
    return not isinstance(filepath, str) or filepath.startswith(PIPE) or "{" in filepath


class WebDatasetShards(VersionedFolderDataset):
    """Shards of samples; ``save`` streams samples in, ``load`` returns a lazy ``ShardSet``.

    ``filepath`` is a folder (local or any fsspec URL: s3://, gs://, http(s)://, memory://),
    or, for a pool that is only read (``versioned: false``): a webdataset brace range
    (``https://host/pool/{00000..00099}.tar``), a ``pipe:`` command, or a list of these
    (several img2dataset runs). Shards are named by their path relative to their root.
    ``credentials`` / ``fs_args`` go to fsspec for listing and for every read. Example::

        raw_pool:
          type: aim_kedro.datasets.WebDatasetShards
          filepath: data/01_raw/raw_pool
          samples_per_shard: 10000
          versioned: true

    ``missing_ok: true`` makes an absent folder (or one without a saved version) load as an
    empty ``ShardSet`` and count as existing, for an optional input such as ``secondary_pool``.
    A location that cannot be reached fails ``exists`` and ``load`` with the real cause.
    """

    def __init__(
        self,
        *,
        filepath: str | Sequence[str],
        samples_per_shard: int = 10_000,
        prefix: str = "shard",
        missing_ok: bool = False,
        version: Any = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._samples_per_shard = samples_per_shard
        self._prefix = prefix
        self._missing_ok = missing_ok
        self._storage_options = {**(credentials or {}), **(fs_args or {})}
        self._spec: str | list[str] | None = None
        if is_shard_spec(filepath):
            if version is not None:
                raise DatasetError(
                    f"WebDatasetShards {filepath!r}: a brace range, pipe: command or list of roots "
                    "is read as it is; set versioned: false"
                )
            self._spec = filepath if isinstance(filepath, str) else [str(p) for p in filepath]
            self._protocol = "spec"
            self.metadata = metadata
            AbstractVersionedDataset.__init__(self, filepath=PurePosixPath("."), version=None)
            return
        super().__init__(
            filepath=filepath, version=version, credentials=credentials, fs_args=fs_args, metadata=metadata
        )

    def _write(self, folder: str, data: Iterable[Sample] | ShardSet) -> None:
        write_shards(data, folder, self._samples_per_shard, self._prefix, fs=self._fs)

    def _open(self, spec: str | list[str]) -> ShardSet:
        try:
            return ShardSet.open(spec, self._storage_options)
        except ImportError as exc:
            raise DatasetError(f"cannot read shards at {spec}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read shards at {spec}: {describe_error(exc)}") from exc

    def _read(self, folder: str) -> ShardSet:
        return self._open(self._full_url(folder))

    def _full_url(self, folder: str) -> str:
        if self._protocol in ("file", "local") or "://" in folder:
            return folder
        return f"{self._protocol}://{folder}"

    def _load(self) -> ShardSet:
        if self._spec is not None:
            return self._open(self._spec)
        if self._missing_ok and not super()._exists():
            return ShardSet(path=self._full_url(self._url(self._filepath)), shards=[])
        return super()._load()

    def _save(self, data: Iterable[Sample] | ShardSet) -> None:
        if self._spec is not None:
            raise DatasetError(f"WebDatasetShards {self._spec!r} is read-only: save to a folder")
        super()._save(data)

    def _exists(self) -> bool:
        if self._missing_ok:
            return True
        if self._spec is not None or (self._protocol not in ("file", "local") and not self._version):
            try:
                self._load()  # an unreachable location raises with its cause, not "no data"
            except DatasetError as exc:
                cause = exc.__cause__
                if isinstance(cause, FileNotFoundError) and str(cause).endswith("does not exist"):
                    return False
                raise
            return True
        return super()._exists()

    def preview(self, nrows: int = 10) -> TablePreview:
        """A table of the first samples (key, shard, uid, caption, image type and size) for kedro-viz."""
        columns = ["key", "shard", "uid", "caption", "image", "bytes"]
        rows = []
        for sample in islice(self.load(), nrows):
            image = image_bytes(sample)
            caption = sample_text(sample)
            rows.append(
                [
                    sample["__key__"],
                    sample.get("__shard__"),
                    sample_json(sample).get("uid"),
                    (caption or "")[:80],
                    image[0] if image else None,
                    len(image[1]) if image else 0,
                ]
            )
        return {"columns": columns, "index": list(range(len(rows))), "data": rows}

    def _describe(self) -> dict[str, Any]:
        if self._spec is not None:
            return {"filepath": self._spec, "protocol": "spec", "version": None}
        return {**super()._describe(), "samples_per_shard": self._samples_per_shard,
                "missing_ok": self._missing_ok}


__all__ = ["WebDatasetShards", "IMAGE_EXTENSIONS"]
