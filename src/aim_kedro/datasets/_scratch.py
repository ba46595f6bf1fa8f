"""Temporary names of atomic saves, the sweep of those that killed saves left, and the error a
save raises when the disk is full.

A save writes under a hidden name beside its target and renames it into place. The name carries
its owner (``.tmp-<pid>.<host tag>-<random>-<label>``), so a sweep removes only files whose
process is gone from this host, and never one that a live run is still writing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from kedro.io import DatasetError

HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
SCRATCH = re.compile(r"^\.(?P<kind>tmp|old)-(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})-[0-9a-f]{8}-(?P<label>.+)$")
NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file size limit is reached"}
_NO_SPACE_TEXT = re.compile(r"No space left|Disk quota exceeded|File too large|os error (28|122|27)\b")


def scratch_name(kind: str, label: str) -> str:
    """A hidden name owned by this process: ``kind`` is ``tmp`` (being written) or ``old``
    (the copy a replacement pushed aside)."""
    return f".{kind}-{os.getpid()}.{HOST_TAG}-{uuid.uuid4().hex[:8]}-{label}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(name: str) -> bool:
    """Whether ``name`` is a scratch file of a process of this host that has ended."""
    match = SCRATCH.match(name)
    return bool(match) and match["host"] == HOST_TAG and not _alive(int(match["pid"]))


def remove(path: Path | str) -> None:
    """Delete a file or a folder, whichever ``path`` is (missing is fine)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(folder: Path | str) -> list[str]:
    """Remove the stale scratch files directly in ``folder``; put an ``.old-`` copy back when its
    replacement never landed. Returns the paths removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        if not stale(entry.name):
            continue
        match = SCRATCH.match(entry.name)
        target = folder / match["label"]
        if match["kind"] == "old" and not target.exists():
            os.rename(entry, target)
            done.append(f"{entry} (restored to {target.name})")
            continue
        remove(entry)
        done.append(str(entry))
    return done


class NoSpaceError(DatasetError):
    """A save ran out of space; the message names the dataset, the free space and what is
    intact. ``expected_error``: the CLI shows the message without a traceback."""

    expected_error = True


def no_space_reason(exc: BaseException) -> str | None:
    """What ran out (``the disk is full``), when ``exc`` or its causes are an out-of-space error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return NO_SPACE[exc.errno]
        found = _NO_SPACE_TEXT.search(str(exc))
        if found:
            text = found.group(0)
            code = {"28": errno.ENOSPC, "122": errno.EDQUOT, "27": errno.EFBIG}.get(found.group(1) or "")
            if code is not None:
                return NO_SPACE[code]
            return ("the disk quota is used up" if "quota" in text
                    else "the file size limit is reached" if "large" in text else "the disk is full")
        exc = exc.__cause__ or exc.__context__
    return None


def free_space(path: Path | str) -> str:
    """Free bytes on the disk that holds ``path`` (its nearest existing parent), readable."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = float(shutil.disk_usage(path).free)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


def no_space_error(exc: BaseException, dataset: str, target: Path | str,
                   previous: str | None) -> NoSpaceError | None:
    """The NoSpaceError for a failed save of ``dataset`` at ``target`` (None when ``exc`` is
    not about space). ``previous``: the version that stays the newest, if any."""
    reason = no_space_reason(exc)
    if reason is None:
        return None
    kept = (f"the previous version {previous} is intact and stays the newest" if previous
            else "there was no previous version")
    relative = os.path.relpath(str(target))
    target = target if relative.startswith("..") else relative
    return NoSpaceError(
        f"saving `{dataset}` to {target} failed: {reason} ({exc}); {free_space(target)} free on "
        f"the disk that holds it. Nothing of this save was kept and {kept}. Free some space "
        "(or raise the limit) and run again."
    )
