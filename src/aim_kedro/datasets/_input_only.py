"""Datasets that a run only reads (or that a node writes through a handle): ``save`` refuses."""

from __future__ import annotations

from typing import Any, NoReturn

from kedro.io import AbstractDataset, DatasetError


class InputOnlyDataset(AbstractDataset[Any, Any]):
    """Base of datasets whose ``save`` is an error saying what the entry is (``SAVE_REFUSAL``)."""

    SAVE_REFUSAL = "an input of the run"
    # True for a work folder that the node taking it as an input writes (a cache, a run
    # directory): a run locks it like an output, so two runs never write it at once.
    written_by_run = False

    def _where(self) -> str:
        return str(self._describe().get("filepath", type(self).__name__))

    def save(self, data: Any) -> NoReturn:
        """Not supported: see ``SAVE_REFUSAL``."""
        raise DatasetError(f"{self._where()} is {self.SAVE_REFUSAL}")


class WorkFolderDataset(InputOnlyDataset):
    """Base of a work folder at ``filepath`` that the node taking it as an input writes through
    a handle (a cache, a run directory): locked like an output, and always there (an empty or
    missing folder is a fresh start)."""

    written_by_run = True
    _filepath: str

    def _exists(self) -> bool:
        return True

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
