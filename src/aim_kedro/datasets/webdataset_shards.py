"""Kedro dataset for a versioned folder of webdataset shards (img2dataset layout)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

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


class WebDatasetShards(VersionedFolderDataset):
    """A folder of ``*.tar`` shards; ``save`` streams samples in, ``load`` returns a lazy ``ShardSet``.

    Example catalog entry::

        raw_pool:
          type: aim_kedro.datasets.WebDatasetShards
          filepath: data/01_raw/raw_pool
          samples_per_shard: 10000
          versioned: true

    ``missing_ok: true`` makes an absent folder (or one without a saved version) load as an
    empty ``ShardSet`` and count as existing, for an optional input such as ``secondary_pool``.
    """

    def __init__(
        self,
        *,
        filepath: str,
        samples_per_shard: int = 10_000,
        prefix: str = "shard",
        missing_ok: bool = False,
        version: Any = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            filepath=filepath, version=version, credentials=credentials, fs_args=fs_args, metadata=metadata
        )
        self._samples_per_shard = samples_per_shard
        self._prefix = prefix
        self._missing_ok = missing_ok

    def _write(self, folder: str, data: Iterable[Sample] | ShardSet) -> None:
        write_shards(data, folder, self._samples_per_shard, self._prefix, fs=self._fs)

    def _read(self, folder: str) -> ShardSet:
        return ShardSet.open(self._full_url(folder))

    def _full_url(self, folder: str) -> str:
        return folder if self._protocol in ("file", "local") else f"{self._protocol}://{folder}"

    def _load(self) -> ShardSet:
        if self._missing_ok and not super()._exists():
            return ShardSet(path=self._full_url(self._url(self._filepath)), shards=[])
        return super()._load()

    def _exists(self) -> bool:
        return self._missing_ok or super()._exists()

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
        return {**super()._describe(), "samples_per_shard": self._samples_per_shard,
                "missing_ok": self._missing_ok}


__all__ = ["WebDatasetShards", "IMAGE_EXTENSIONS"]
