"""Several ``kedro run`` in one project: a run locks what it writes, claims its version, and
sweeps the temporary files that killed saves left behind.

- Every entry a run writes (its persisted outputs, and the work folders its nodes write through
  a handle: the score cache, the pre-training run directory) is locked with ``flock`` on a
  ``.lock-<entry>`` file beside it. A second run that would write one of them fails at once,
  naming the entries and the run that holds them, or waits up to ``AIM_KEDRO_LOCK_WAIT``
  seconds. Runs that write different entries go on side by side. The OS drops a killed run's
  locks.
- The run's version (the ``run_manifest`` folder ``<version>/``) is created exclusively, so two
  runs never share a version.
- Stale ``.tmp-*`` / ``.old-*`` files of saves whose process is gone are removed (an ``.old-``
  copy whose replacement never landed is put back); a live run's are left alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from kedro.pipeline import Pipeline

from aim_kedro.checks import RunRefused
from aim_kedro.lineage import MANIFEST, command_line, dataset_of, entry_folder, is_memory

logger = logging.getLogger(__name__)

LOCK_WAIT_ENV = "AIM_KEDRO_LOCK_WAIT"
POLL_S = 0.5


def lock_path(folder: Path | str) -> Path:
    """The lock file of an entry stored at ``folder`` (a sibling: ``.lock-<name>``)."""
    folder = Path(folder)
    return folder.parent / f".lock-{folder.name}"


def written_entries(pipeline: Pipeline, catalog: Any) -> dict[str, Path]:
    """Entry -> its local storage path, for everything the run writes: persisted outputs, and
    free inputs that nodes write through a handle (``written_by_run`` datasets)."""
    written = {}
    candidates = [(name, True) for name in pipeline.all_outputs()]
    candidates += [(name, False) for name in pipeline.inputs() if not name.startswith("params:")]
    for name, is_output in candidates:
        if name == MANIFEST:
            continue
        dataset = dataset_of(catalog, name)
        if is_memory(dataset) or not (is_output or getattr(dataset, "written_by_run", False)):
            continue
        folder = entry_folder(dataset)
        if folder is not None:
            written[name] = Path(str(folder))
    return written


class RunGuard:
    """Locks, version claim and sweep of one run (``start`` before the first node, ``release``
    when it ends)."""

    def __init__(self, version: str, wait_s: float | None = None) -> None:
        self.version = version
        self.wait_s = float(os.environ.get(LOCK_WAIT_ENV, "0") or 0) if wait_s is None else wait_s
        self._fds: dict[str, int] = {}
        self._claimed: Path | None = None
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "version": version,
                      "command": command_line(), "since": time.strftime("%H:%M:%S")}

    def start(self, pipeline: Pipeline, catalog: Any) -> None:
        """Lock what the run writes, claim its version, sweep stale temporaries."""
        self.lock(written_entries(pipeline, catalog))
        try:
            self.claim(catalog)
        except BaseException:
            self.release()
            raise
        swept = sweep_catalog(catalog)
        if swept:
            logger.info("removed %d temporary file(s) of saves killed earlier: %s", len(swept),
                        ", ".join(swept[:5]) + (" ..." if len(swept) > 5 else ""))

    def lock(self, entries: dict[str, Path]) -> None:
        """Take every entry's lock (sorted, so waiting runs never deadlock) or raise RunRefused."""
        deadline = time.monotonic() + self.wait_s
        busy: dict[str, dict[str, Any]] = {}
        told = False
        for name in sorted(entries):
            path = lock_path(entries[name])
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if busy or time.monotonic() >= deadline:
                        busy[name] = _holder(fd)
                        os.close(fd)
                        break
                    if not told:
                        logger.warning("waiting up to %.0f s for %s: %s", self.wait_s, name,
                                       _describe(_holder(fd)))
                        told = True
                    time.sleep(POLL_S)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.owner).encode(), 0)
                self._fds[name] = fd
                break
        if busy:
            self.release()
            holders = {json.dumps(h, sort_keys=True): h for h in busy.values()}
            who = "; ".join(_describe(h) for h in holders.values())
            raise RunRefused(
                f"another kedro run is writing {', '.join(sorted(busy))}, which this run would "
                f"write too ({who}). Two runs writing the same entries would mix their outputs "
                f"and work caches. Wait for it to finish, set {LOCK_WAIT_ENV}=<seconds> to wait "
                "for it, or run a pipeline that writes other entries."
            )

    def claim(self, catalog: Any) -> None:
        """Create the run manifest's ``<version>/`` folder: a second run of the same version fails."""
        dataset = dataset_of(catalog, MANIFEST)
        folder = entry_folder(dataset) if dataset is not None else None
        if folder is None:
            return
        path = Path(str(folder)) / self.version
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError as exc:
            raise RunRefused(f"another run already has version {self.version} ({path}): two runs "
                             "started in the same millisecond; start this one again") from exc
        self._claimed = path

    def release(self) -> None:
        """Drop the locks (and the version claim, when no manifest went into it)."""
        for fd in self._fds.values():
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._fds.clear()
        if self._claimed is not None and not any(self._claimed.iterdir()):
            try:
                self._claimed.rmdir()
            except OSError:
                pass
            self._claimed = None


def _holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that has not said who it is yet"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, run {holder.get('version')}, "
            f"`{holder.get('command')}`, since {holder.get('since')}")


def sweep_catalog(catalog: Any) -> list[str]:
    """Sweep the folders that hold the catalog's local entries (see ``datasets._scratch``)."""
    from aim_kedro.datasets._scratch import sweep  # the datasets package imports torch

    folders = set()
    for name in catalog.keys():
        try:
            folder = entry_folder(dataset_of(catalog, name))
        except Exception:  # noqa: BLE001 - an entry that cannot be built has no files of ours
            continue
        if folder is not None:
            folders.add(Path(str(folder)).parent)
    removed = []
    for folder in sorted(folders):
        removed.extend(sweep(folder))
    return removed
