"""Kedro dataset for a resumable stage's per-shard work cache (not versioned: entries are keyed
by fingerprints of their inputs, so a stale entry is never read)."""

from __future__ import annotations

from typing import Any

from kedro_datasets._typing import TablePreview

from aim_kedro.curation.resume import ShardResultCache
from aim_kedro.datasets._input_only import WorkFolderDataset


class ShardResultCacheDataset(WorkFolderDataset):
    """``load()`` gives a ``ShardResultCache`` on ``filepath``; the node that takes it as an input
    saves each finished shard there, and a re-run after a crash skips those shards.

    Example catalog entry::

        clip_score_cache:
          type: aim_kedro.datasets.ShardResultCacheDataset
          filepath: data/04_feature/clip_score_cache
    """

    SAVE_REFUSAL = "a work cache: the node that takes it as an input writes it"

    def __init__(
        self,
        *,
        filepath: str,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = str(filepath)
        self._fs_args = dict(fs_args or {})
        self.metadata = metadata

    def load(self) -> ShardResultCache:
        """The cache handle (an empty folder is a valid, empty cache)."""
        return ShardResultCache(self._filepath, self._fs_args)


    def preview(self, nrows: int = 20) -> TablePreview:
        """Finished entries (stage, fingerprint, shard) for kedro-viz."""
        keys = ShardResultCache(self._filepath, self._fs_args).keys()
        rows = [(key.split("/", 2) + ["", ""])[:3] for key in keys[:nrows]]
        return {"columns": ["stage", "fingerprint", "entry"], "index": list(range(len(rows))),
                "data": rows}
