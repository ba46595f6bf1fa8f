"""Kedro datasets that the catalog names: shard folders and model checkpoints, all versioned."""

from aim_kedro.datasets.checkpoints import AIMCheckpointDataset, CheckpointSeriesDataset
from aim_kedro.datasets.webdataset_shards import WebDatasetShards
from aim_kedro.datasets.work_cache import ShardResultCacheDataset

__all__ = [
    "AIMCheckpointDataset",
    "CheckpointSeriesDataset",
    "ShardResultCacheDataset",
    "WebDatasetShards",
]
