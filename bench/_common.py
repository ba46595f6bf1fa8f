"""Helpers shared by the benchmarks: timing statistics, table printing, environment line.

Every benchmark prints an aligned table and, as its LAST line, a one-line summary. Scripts run
from the repository root as ``.venv/bin/python bench/<name>.py`` (this folder is then on
``sys.path``, which is how they import this module).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Stats:
    """Median and inter-quartile range of repeated measurements (same unit as the samples)."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        """q3 - q1: the spread of the middle half."""
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        """IQR / median (0 when the median is 0)."""
        return self.iqr / self.median if self.median else 0.0


def stats(samples: Sequence[float]) -> Stats:
    """Median and quartiles (inclusive method, so 2+ samples suffice)."""
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("stats() needs at least one sample")
    if len(values) == 1:
        return Stats(values[0], values[0], values[0], 1)
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Stats(med, q1, q3, len(values))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock reading covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``repeat`` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def load_average() -> str:
    """The 1/5/15-minute load averages as ``'9.4 8.9 5.0'`` ('n/a' where the OS has none)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def environment_line(device: torch.device | None = None) -> str:
    """One line naming what the figures depend on: host, cores, torch threads, device, load."""
    dev = "cpu"
    if device is not None and device.type == "cuda":
        dev = f"cuda ({torch.cuda.get_device_name(device)})"
    return (
        f"# {platform.node()} | python {platform.python_version()} | torch {torch.__version__} | "
        f"cores {os.cpu_count()} | torch threads {torch.get_num_threads()} | device {dev} | "
        f"load average {load_average()}"
    )


def peak_rss_mib() -> float:
    """Peak resident set size of THIS process so far, in MiB (ru_maxrss: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux ``/proc/self/clear_refs``), so that
    :func:`current_peak_rss_mib` gives the peak since now; False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_peak_rss_mib() -> float | None:
    """Peak RSS in MiB since the last :func:`reset_peak_rss` (``VmHWM``; None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ForwardCpu:
    """CPU seconds this process spends in model forward passes (the outermost call only): every
    ``torch.nn.Module`` forward (torch's global module hooks), and the non-torch networks the
    curation stages run: dlib's MMOD CNN face detector, onnxruntime sessions (NudeNet) and
    OpenCV's YuNet. That is the model inference a pipeline's own cost excludes. ``seconds``
    counts every thread (``resource.getrusage``); work in other processes is not seen."""

    # (module, class, method) of the non-torch forward passes; each method runs the network on an
    # already prepared frame and reads its rectangles out (the detectors' ``_rects``).
    PATCHES = (
        ("aim_kedro.curation.faces_dlib", "DlibCnnDetector", "_rects"),
        ("aim_kedro.curation.faces", "YuNetOnnxDetector", "_rects"),
        ("onnxruntime", "InferenceSession", "run"),
    )

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0
        self._handles: list[Any] = []
        self._patched: list[tuple[type, str, Any | None]] = []

    def _enter(self, *_: Any) -> None:
        if self._depth == 0:
            self._start = cpu_seconds()
        self._depth += 1

    def _leave(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += cpu_seconds() - self._start

    def _wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._enter()
            try:
                return method(*args, **kwargs)
            finally:
                self._leave()

        return timed

    def __enter__(self) -> ForwardCpu:
        import importlib

        from torch.nn.modules import module

        self._handles = [module.register_module_forward_pre_hook(self._enter),
                         module.register_module_forward_hook(self._leave, always_call=True)]
        for module_name, class_name, method_name in self.PATCHES:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue  # not installed here: nothing of it runs
            self._patched.append((cls, method_name, cls.__dict__.get(method_name)))
            setattr(cls, method_name, self._wrap(getattr(cls, method_name)))
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for cls, method_name, original in reversed(self._patched):
            if original is None:  # inherited: drop the wrapper, the base's method shows again
                delattr(cls, method_name)
            else:
                setattr(cls, method_name, original)
        self._patched = []


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads), and of its children that
    ended (the local executor's worker processes)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def decode_floor(images: Sequence[bytes], size: int = 224, repeats: int = 3) -> float:
    """Images per CPU-second of Pillow alone: open, decode to RGB and one bicubic resize to
    ``size`` x ``size``; the best of ``repeats`` passes (the least disturbed by other work)."""
    import io

    from PIL import Image

    best = float("inf")
    for _ in range(repeats):
        start = cpu_seconds()
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        best = min(best, cpu_seconds() - start)
    return len(images) / best if best > 0 else float("inf")


RESULT_PREFIX = "BENCH_RESULT "  # the line a bench's --worker subprocess prints its result on


def print_result(result: dict[str, Any]) -> None:
    """Print a worker's result as the one line ``worker_result`` reads back."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker_result(stdout: str, returncode: int, what: str, tail: str) -> dict[str, Any]:
    """The result a ``--worker`` subprocess printed (its last ``RESULT_PREFIX`` line); exits
    naming ``what`` with ``tail`` (its log) when it failed or printed none."""
    if returncode != 0:
        raise SystemExit(f"{what} failed with exit code {returncode}\n{tail}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise SystemExit(f"{what} printed no result:\n{stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def param_value(params: dict[str, Any], name: str) -> Any:
    """The value of ``params:a.b.c`` in a parameters tree."""
    value: Any = params
    for part in name.removeprefix("params:").split("."):
        value = value[part]
    return value


def table_height(value: Any) -> int | None:
    """The row count of a table output (None for anything else)."""
    height = getattr(value, "height", None)
    return int(height) if isinstance(height, int) else None


def fmt(value: Any, spec: str = "") -> str:
    """Format a cell; None and NaN become '-'."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if spec:
        return format(value, spec)
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` as an aligned Markdown table; ``columns`` are (key, header, format spec).

    Numbers are right-aligned, text left-aligned; missing keys print as '-'.
    """
    cells = [[fmt(row.get(key), spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row.get(key), int | float) or row.get(key) is None for row in rows)
        for key, _, _ in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    print(line(headers))
    print("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                         for w, num in zip(widths, numeric, strict=True)) + "|")
    for row in cells:
        print(line(row))


def summary(text: str) -> None:
    """Print the one-line summary; callers make this the script's last output."""
    print(text, flush=True)


def synthetic_pool(
    n: int, image_size: int, seed: int = 0, duplicate_fraction: float = 0.05,
    face_fraction: float = 0.05,
) -> Iterator[dict[str, Any]]:
    """``n`` pool samples (``jpg``, ``txt``, ``json`` with ``uid`` and ``source``) like the
    embedded sample's: coloured digits and photo crops rendered by the sample pipeline's
    ``sources`` at ``image_size`` px, a share of faces pasted into scenes, and a share of exact
    (byte) and near (re-encoded at another quality) duplicates so dedup has work. Streams; keeps
    only a small ring of recent images for the duplicates.
    """
    import numpy as np

    from aim_kedro.pipelines.sample import sources

    rng = np.random.default_rng(seed)
    photos = list(sources.PHOTO_SOURCES)
    n_digits = len(sources.digits()[1])
    n_faces = len(sources.lfw_faces())
    recent: list[tuple[bytes, str, str]] = []
    for i in range(n):
        draw = rng.random()
        if recent and draw < duplicate_fraction:
            data, caption, source = recent[int(rng.integers(len(recent)))]
            if rng.random() < 0.5:
                data = sources.encode(sources.decode(data), "jpg", quality=75)
        else:
            if draw < duplicate_fraction + face_fraction:
                r = sources.render_pasted_face(int(rng.integers(n_faces)), image_size, rng)
            elif rng.random() < 0.5:
                r = sources.render_digit(int(rng.integers(n_digits)), image_size, rng)
            else:
                r = sources.render_photo(photos[int(rng.integers(len(photos)))], image_size, rng)
            data, caption, source = sources.encode(r.image), r.caption, r.source
            recent = (recent + [(data, caption, source)])[-64:]
        uid = hashlib.blake2b(f"bench/{seed}/{i}".encode(), digest_size=16).hexdigest()
        yield {
            "__key__": f"{i:09d}",
            "jpg": data,
            "txt": caption,
            "json": {"uid": uid, "source": source, "key": f"{i:09d}"},
        }
