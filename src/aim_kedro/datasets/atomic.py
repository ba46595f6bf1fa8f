"""kedro-datasets' parquet, JSON and matplotlib datasets with atomic saves on local disks.

The stock datasets write straight into ``filepath/<version>/<name>``, so a run killed mid-save
leaves a half-written file that the next load would pick up as the latest version. These
subclasses write beside ``filepath`` under a hidden temporary name (swept by the next run when
its process is gone) and rename into place; a save that runs out of space raises
``NoSpaceError`` naming the entry, the free space and the version that stays the newest.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

from kedro_datasets._typing import TablePreview
from kedro_datasets.json import JSONDataset as _JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset as _MatplotlibDataset
from kedro_datasets.pickle import PickleDataset as _PickleDataset
from kedro_datasets.polars import EagerPolarsDataset as _EagerPolarsDataset

from aim_kedro.datasets._scratch import no_space_error, remove, scratch_name

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
    tmp = PurePosixPath(dataset._filepath).parent / scratch_name("tmp", real.name)
    os.makedirs(str(tmp.parent), exist_ok=True)
    dataset._get_save_path = lambda: tmp
    try:
        original(dataset, data)
        os.makedirs(str(real.parent), exist_ok=True)
        os.rename(str(tmp), str(real))
    except BaseException as exc:
        remove(str(tmp))
        error = no_space_error(exc, PurePosixPath(str(dataset._filepath)).stem, str(real),
                               _newest_version(dataset))
        if error is not None:
            raise error from exc
        raise
    finally:
        del dataset._get_save_path


def _newest_version(dataset: Any) -> str | None:
    if not getattr(dataset, "_version", None):
        return "(the file as it was)"
    try:
        versions = dataset.list_versions(full_path=False)
    except Exception:  # noqa: BLE001 - no version yet
        return None
    return versions[0] if versions else None


def _plain(value: Any) -> Any:
    """A table cell as kedro-viz can serialise it: bytes as a short hex string, recursively."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        head = raw[:16].hex()
        return f"0x{head}{'...' if len(raw) > 16 else ''} ({len(raw)} bytes)"
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class EagerPolarsDataset(_EagerPolarsDataset):
    """``polars.EagerPolarsDataset`` whose saves are atomic on local disks."""

    def save(self, data: Any) -> None:
        _atomic_save(self, _EagerPolarsDataset, data)

    def preview(self, nrows: int = 5) -> TablePreview:
        """First rows for kedro-viz as plain Python values (list and binary columns included)."""
        frame = self.load().head(nrows)
        return TablePreview({"columns": frame.columns, "index": list(range(frame.height)),
                             "data": [_plain(list(row)) for row in frame.iter_rows()]})


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
