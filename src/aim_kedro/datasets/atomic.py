"""kedro-datasets' parquet, JSON and matplotlib datasets with atomic saves on local disks.

The stock datasets write straight into ``filepath/<version>/<name>``, so a run killed mid-save
leaves a half-written file that the next load would pick up as the latest version. These
subclasses write beside ``filepath`` under a hidden temporary name and rename into place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import PurePosixPath
from typing import Any

from kedro_datasets._typing import TablePreview
from kedro_datasets.json import JSONDataset as _JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset as _MatplotlibDataset
from kedro_datasets.pickle import PickleDataset as _PickleDataset
from kedro_datasets.polars import EagerPolarsDataset as _EagerPolarsDataset

LOCAL_PROTOCOLS = ("file", "local")


def _unwrapped_save(cls: type) -> Any:
    """The dataset class's own save function, without Kedro's versioning wrapper."""
    save = cls.save
    while hasattr(save, "__wrapped__"):
        save = save.__wrapped__
    return save


def _atomic_save(dataset: Any, parent_cls: type, data: Any) -> None:
    real = dataset._get_save_path()
    original = _unwrapped_save(parent_cls)
    if dataset._protocol not in LOCAL_PROTOCOLS:
        original(dataset, data)
        return
    tmp = PurePosixPath(dataset._filepath).parent / f".tmp-{uuid.uuid4().hex[:12]}-{real.name}"
    os.makedirs(str(tmp.parent), exist_ok=True)
    dataset._get_save_path = lambda: tmp
    try:
        original(dataset, data)
        os.makedirs(str(real.parent), exist_ok=True)
        os.rename(str(tmp), str(real))
    except BaseException:
        if os.path.isdir(str(tmp)):
            shutil.rmtree(str(tmp), ignore_errors=True)
        elif os.path.exists(str(tmp)):
            os.remove(str(tmp))
        raise
    finally:
        del dataset._get_save_path


class EagerPolarsDataset(_EagerPolarsDataset):
    """``polars.EagerPolarsDataset`` whose saves are atomic on local disks."""

    def save(self, data: Any) -> None:
        _atomic_save(self, _EagerPolarsDataset, data)

    def preview(self, nrows: int = 5) -> TablePreview:
        """First rows for kedro-viz as plain Python values (list columns included)."""
        frame = self.load().head(nrows)
        return TablePreview({"columns": frame.columns, "index": list(range(frame.height)),
                             "data": [list(row) for row in frame.iter_rows()]})


class JSONDataset(_JSONDataset):
    """``json.JSONDataset`` whose saves are atomic on local disks."""

    def save(self, data: Any) -> None:
        _atomic_save(self, _JSONDataset, data)


class MatplotlibDataset(_MatplotlibDataset):
    """``matplotlib.MatplotlibDataset`` (PNG writer) whose saves are atomic on local disks."""

    def save(self, data: Any) -> None:
        _atomic_save(self, _MatplotlibDataset, data)


class PickleDataset(_PickleDataset):
    """``pickle.PickleDataset`` whose saves are atomic on local disks."""

    def save(self, data: Any) -> None:
        _atomic_save(self, _PickleDataset, data)
