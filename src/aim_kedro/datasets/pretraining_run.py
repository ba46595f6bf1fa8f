"""Kedro dataset for the pre-training run directory (resume state and kept steps; unversioned:
the training node writes it step by step and resumes from it)."""

from __future__ import annotations

import json
from typing import Any

from kedro.io import DatasetError
from kedro_datasets._typing import JSONPreview

from aim_kedro.aim.checkpoint import RunDir
from aim_kedro.datasets._input_only import WorkFolderDataset


class PretrainingRunDataset(WorkFolderDataset):
    """``load()`` gives a ``RunDir`` on ``filepath``; the training node that takes it as an input
    writes ``last.pt``, kept steps and ``result.json`` there, and a re-run resumes from them.

    Example catalog entry::

        pretraining_run:
          type: aim_kedro.datasets.PretrainingRunDataset
          filepath: data/06_models/pretraining_run
    """

    SAVE_REFUSAL = "a run directory: the training node that takes it as an input writes it"

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        if "://" in str(filepath) and not str(filepath).startswith("file://"):
            raise DatasetError(
                f"pretraining_run filepath {filepath} must be a local folder (or a shared mount "
                "every node of a multi-node job sees)"
            )
        self._filepath = str(filepath).removeprefix("file://")
        self.metadata = metadata

    def load(self) -> RunDir:
        """The run-directory handle (a folder that does not exist yet is a fresh run)."""
        return RunDir(self._filepath)


    def preview(self) -> JSONPreview:
        """The resume step, the kept steps and whether a run finished, for kedro-viz."""
        return JSONPreview(json.dumps(RunDir(self._filepath).summary(), indent=2))
