"""img2dataset / DataComp sidecars: the files beside each shard that list what it should hold.

img2dataset writes, next to ``00000.tar``, ``00000.parquet`` (one row per attempted sample:
``key``, ``url``, ``caption``, ``status`` (``success``, ``failed_to_download``,
``failed_to_resize``), ``error_message``, sizes, and every column of
``--save_additional_columns``) and ``00000_stats.json`` (the counts). DataComp's shards carry the
same parquet with its metadata (``uid``, CLIP scores, face boxes). A shard without them is
read as it is.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from aim_kedro.io.sources import ReadRetry, fetch_optional, sidecar_location, with_retries

PARQUET_SUFFIX = ".parquet"
STATS_SUFFIX = "_stats.json"
SUCCESS = "success"
BOOKKEEPING_COLUMNS = (
    "key", "uid", "url", "caption", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "sha256", "md5",
)
"""img2dataset's own columns: what the index reads itself rather than carries as extras."""


@dataclass(frozen=True)
class Sidecar:
    """What the files beside one shard say: the parquet table (None when there is none; ``key``
    as strings) and the stats (None when there is none)."""

    table: pl.DataFrame | None = None
    stats: Mapping[str, Any] | None = None
    parquet: str | None = None

    @property
    def extra_columns(self) -> list[str]:
        """The parquet's columns beyond img2dataset's own: ``--save_additional_columns``,
        DataComp's metadata; carried into the manifests and the subset's json."""
        if self.table is None:
            return []
        return [c for c in self.table.columns if c not in BOOKKEEPING_COLUMNS]

    def stats_attempted(self) -> int | None:
        """How many samples the stats say were attempted (``count``), or None."""
        if not self.stats or "count" not in self.stats:
            return None
        return int(self.stats["count"])


def read_sidecar(
    location: str,
    shard: str,
    retry: ReadRetry | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Sidecar:
    """The sidecars of the shard at ``location`` (id ``shard``), fetched with ``retry``; an
    absent file is None, a transfer that keeps failing raises ``UnreadableShardError`` and a
    file that is not what it should be raises ValueError naming it."""
    retry = retry or ReadRetry()
    parquet = sidecar_location(location, PARQUET_SUFFIX)
    stats_file = sidecar_location(location, STATS_SUFFIX)
    if parquet is None or stats_file is None:
        return Sidecar()

    def fetch(where: str) -> bytes | None:
        return with_retries(lambda: fetch_optional(where, storage_options), retry, shard, where)

    table = None
    raw = fetch(parquet)
    if raw is not None:
        try:
            table = pl.read_parquet(io.BytesIO(raw))
        except Exception as exc:  # noqa: BLE001 - name the file and the cause
            raise ValueError(f"sidecar {parquet} of shard {shard} is not a parquet file: {exc}") from exc
        if "key" not in table.columns:
            raise ValueError(
                f"sidecar {parquet} of shard {shard} has no 'key' column (columns: "
                f"{table.columns}); img2dataset and DataComp sidecars list each sample's key"
            )
        table = table.with_columns(pl.col("key").cast(pl.String))
    stats = None
    raw = fetch(stats_file)
    if raw is not None:
        try:
            stats = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"sidecar {stats_file} of shard {shard} is not JSON: {exc}") from exc
    return Sidecar(table=table, stats=stats, parquet=parquet)


__all__ = ["BOOKKEEPING_COLUMNS", "SUCCESS", "Sidecar", "read_sidecar"]
