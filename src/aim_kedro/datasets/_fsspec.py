"""The one constructor of this project's versioned datasets on an fsspec filesystem."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io import AbstractVersionedDataset, Version
from kedro.io.core import get_protocol_and_path


class FsspecVersionedDataset(AbstractVersionedDataset):
    """Base of versioned datasets at ``filepath`` (any fsspec protocol; ``credentials`` and
    ``fs_args`` open its filesystem): sets ``_protocol``, ``_fs`` and ``metadata``."""

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(credentials or {}), **(fs_args or {}))
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )
