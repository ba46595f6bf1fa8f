"""Datasets that a run only reads (or that a node writes through a handle): ``save`` refuses."""

from __future__ import annotations

from typing import Any, NoReturn

from kedro.io import AbstractDataset, DatasetError


class InputOnlyDataset(AbstractDataset[Any, Any]):
    """Base of datasets whose ``save`` is an error saying what the entry is (``SAVE_REFUSAL``)."""

    SAVE_REFUSAL = "an input of the run"

    def _where(self) -> str:
        return str(self._describe().get("filepath", type(self).__name__))

    def save(self, data: Any) -> NoReturn:
        """Not supported: see ``SAVE_REFUSAL``."""
        raise DatasetError(f"{self._where()} is {self.SAVE_REFUSAL}")
