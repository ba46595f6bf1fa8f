"""Kedro dataset for a labelled ImageFolder tree (``root/<class>/<image>``), read-only."""

from __future__ import annotations

import os
from typing import Any

from kedro_datasets._typing import TablePreview

from aim_kedro.aim.evalsets import (
    LabelledSet,
    from_image_folder,
    image_folder_classes,
    image_folder_files,
)
from aim_kedro.datasets._input_only import InputOnlyDataset


class ImageFolderDataset(InputOnlyDataset):
    """``load()`` gives a lazy ``LabelledSet`` over the tree (one sub-folder per class, sorted);
    the evaluation pipeline re-indexes a test split into its training split's classes by name.

    Point ``probe_train`` / ``probe_test`` at an ImageFolder tree in conf/local/catalog.yml::

        probe_train:
          type: aim_kedro.datasets.ImageFolderDataset
          filepath: /data/imagenet/train
        probe_test:
          type: aim_kedro.datasets.ImageFolderDataset
          filepath: /data/imagenet/val
    """

    SAVE_REFUSAL = "a read-only ImageFolder tree"

    def __init__(self, *, filepath: str, name: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._filepath = str(filepath)
        self._name = name or os.path.basename(os.path.normpath(self._filepath))
        self.metadata = metadata

    def load(self) -> LabelledSet:
        """The labelled set (FileNotFoundError / ValueError name the folder when it is unusable)."""
        return from_image_folder(self._filepath, name=self._name)


    def _exists(self) -> bool:
        return os.path.isdir(self._filepath)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "name": self._name}

    def preview(self, nrows: int = 20) -> TablePreview:
        """Images per class (the first classes), for kedro-viz."""
        classes = image_folder_classes(self._filepath)
        counts: dict[int, int] = {}
        for _, label in image_folder_files(self._filepath, classes[:nrows]):
            counts[label] = counts.get(label, 0) + 1
        rows = [[i, name, counts.get(i, 0)] for i, name in enumerate(classes[:nrows])]
        return {"columns": ["label", "class", "images"], "index": list(range(len(rows))),
                "data": rows}
