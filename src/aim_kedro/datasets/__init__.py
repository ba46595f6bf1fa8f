"""Kedro datasets that the catalog names: shard folders, image folders, model checkpoints, the
pre-training run directory, work caches and DataComp uid lists."""

from aim_kedro.datasets.checkpoints import (
    AIMCheckpointDataset,
    CheckpointSeriesDataset,
    StateDictDataset,
)
from aim_kedro.datasets.image_folder import ImageFolderDataset
from aim_kedro.datasets.pretraining_run import PretrainingRunDataset
from aim_kedro.datasets.uid_list import UidListDataset
from aim_kedro.datasets.webdataset_shards import WebDatasetShards
from aim_kedro.datasets.work_cache import ShardResultCacheDataset

__all__ = [
    "AIMCheckpointDataset",
    "CheckpointSeriesDataset",
    "ImageFolderDataset",
    "PretrainingRunDataset",
    "ShardResultCacheDataset",
    "StateDictDataset",
    "UidListDataset",
    "WebDatasetShards",
]
