"""A versioned Kedro dataset whose artifact is a folder, written atomically."""

from __future__ import annotations

import os
import posixpath
from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import get_filepath_str

from aim_kedro.datasets._fsspec import FsspecVersionedDataset
from aim_kedro.datasets._scratch import no_space_error, remove, scratch_name

LOCAL_PROTOCOLS = ("file", "local")


class VersionedFolderDataset(FsspecVersionedDataset):
    """Base for datasets stored as a folder at ``filepath/<version>/<name>/``.

    Saves go to a hidden temporary folder beside ``filepath`` and are renamed into place in one
    step on local disks, so a save killed half-way leaves no version that a load would pick up
    (the next run sweeps the temporary folder), and a save that runs out of space raises
    ``NoSpaceError`` naming the entry, the free space and the version that stays the newest.
    Subclasses implement ``_write(folder, data)`` and ``_read(folder)`` on a local or fsspec path. Kedro wraps
    ``_load``/``_save`` once per subclass with its versioning logic.
    """

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem the folder lives on."""
        return self._fs

    def _url(self, path: PurePosixPath | str) -> str:
        return get_filepath_str(PurePosixPath(path), self._protocol)

    def _write(self, folder: str, data: Any) -> None:
        raise NotImplementedError

    def _read(self, folder: str) -> Any:
        raise NotImplementedError

    def _load(self) -> Any:
        """Read the latest (or the pinned) version's folder."""
        return self._read(self._url(self._get_load_path()))

    def _save(self, data: Any) -> None:
        """Write a new version, atomically on local disks."""
        save_path = self._get_save_path()
        if self._protocol not in LOCAL_PROTOCOLS:
            self._write(self._url(save_path), data)
            return
        if not self._version:
            self._replace_unversioned(save_path, data)
            return
        version_dir = save_path.parent
        parent = version_dir.parent.parent
        tmp_root = parent / scratch_name("tmp", f"{version_dir.parent.name}-{version_dir.name}")
        tmp_folder = tmp_root / save_path.name
        os.makedirs(tmp_folder, exist_ok=False)
        try:
            self._write(str(tmp_folder), data)
            os.makedirs(version_dir.parent, exist_ok=True)
            os.rename(tmp_root, version_dir)
        except BaseException as exc:
            remove(tmp_root)
            self._raise_if_no_space(exc, version_dir.parent, self._newest_version())
            raise

    def _replace_unversioned(self, save_path: PurePosixPath, data: Any) -> None:
        """Unversioned: write beside the folder, then swap it in (the old copy goes last)."""
        tmp_folder = save_path.parent / scratch_name("tmp", save_path.name)
        old_folder = save_path.parent / scratch_name("old", save_path.name)
        os.makedirs(tmp_folder, exist_ok=False)
        try:
            self._write(str(tmp_folder), data)
        except BaseException as exc:
            remove(tmp_folder)
            self._raise_if_no_space(exc, save_path, "(the folder as it was)")
            raise
        if os.path.exists(save_path):
            os.rename(save_path, old_folder)
        os.rename(tmp_folder, save_path)
        remove(old_folder)

    def _newest_version(self) -> str | None:
        try:
            versions = self.list_versions(full_path=False)
        except Exception:  # noqa: BLE001 - no version yet
            return None
        return versions[0] if versions else None

    def _raise_if_no_space(self, exc: BaseException, target: PurePosixPath, previous: str | None) -> None:
        error = no_space_error(exc, PurePosixPath(str(self._filepath)).name, str(target), previous)
        if error is not None:
            raise error from exc

    def _exists(self) -> bool:
        try:
            load_path = self._url(self._get_load_path())
        except Exception:  # noqa: BLE001 - kedro raises its own error when no version exists
            return False
        return self._fs.exists(load_path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "protocol": self._protocol, "version": self._version}

    def _join(self, folder: str, name: str) -> str:
        return posixpath.join(folder, name)
