"""Kedro dataset for a DataComp uid list: a ``.npy`` of two uint64 per 128-bit uid, sorted."""

from __future__ import annotations

import io
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import get_filepath_str
from kedro_datasets._typing import TablePreview

from aim_kedro.datasets._fsspec import FsspecVersionedDataset
from aim_kedro.datasets.atomic import _atomic_save
from aim_kedro.io.uids import from_datacomp, to_datacomp


class _UidListFile(FsspecVersionedDataset):

    def load(self) -> np.ndarray:
        """The uid list as DataComp's sorted ``u8,u8`` array (``io.uids.from_datacomp`` turns
        it into hex uids)."""
        path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(path, "rb") as handle:
            array = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        from_datacomp(array[:1])  # a file that is not a uid list fails here, naming the dtype
        return array

    def save(self, data: Any) -> None:
        """Write a uid list: DataComp's array, or any iterable of uids (``io.uids.to_datacomp``)."""
        array = data if isinstance(data, np.ndarray) and data.dtype.names else to_datacomp(data)
        buffer = io.BytesIO()
        np.save(buffer, array)
        path = get_filepath_str(self._get_save_path(), self._protocol)
        self._fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        with self._fs.open(path, "wb") as handle:
            handle.write(buffer.getvalue())

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except Exception:  # noqa: BLE001 - no version yet
            return False
        return self._fs.exists(path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "protocol": self._protocol, "version": self._version}


class UidListDataset(_UidListFile):
    """The kept uids in DataComp's subset format, what its resharder reads (``-s dfn_uids.npy``)
    and what ``curation.index.uid_list`` applies; saves are atomic on local disks. Example::

        dfn_uids:
          type: aim_kedro.datasets.UidListDataset
          filepath: data/05_model_input/dfn_uids.npy
          versioned: true
    """

    def save(self, data: Any) -> None:
        """Write atomically (a temporary name, then renamed into the version)."""
        _atomic_save(self, _UidListFile, data)

    def preview(self, nrows: int = 10) -> TablePreview:
        """The first uids, as hex, for kedro-viz."""
        uids = from_datacomp(self.load()[:nrows])
        return TablePreview({"columns": ["uid"], "index": list(range(len(uids))),
                             "data": [[u] for u in uids]})


__all__ = ["UidListDataset"]
