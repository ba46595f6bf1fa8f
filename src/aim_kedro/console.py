"""Quiet, readable runs: no warnings that are noise to a user of the project, and progress bars
that write at a bounded rate when the output is not a terminal (a log file, CI).

``settings.py`` calls :func:`quiet` when Kedro bootstraps the project, which happens before
Kedro imports its plugins, so the filters are in place when kedro-mlflow imports MLflow.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from functools import partialmethod
from typing import Any, TextIO

# (message regex, category): warnings that say nothing a user of this project can act on.
NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # Kedro 1.7's config loader calls a deprecated OmegaConf API on every load.
    (r"register_new_resolver\(\) is deprecated", Warning),
    # MLflow (imported by kedro-mlflow's CLI plugin) about kedro-mlflow's own model class,
    # wrapped in raw terminal escape codes.
    (r".*Add type hints to the `predict` method", UserWarning),
)
# Seconds between two writes of a progress bar when stderr is not a terminal.
PROGRESS_INTERVAL_S = 30.0


_NOISE_TEXT = re.compile("|".join(message.removeprefix(".*") for message, _ in NOISE))


def is_noise(text: str) -> bool:
    """Whether a warning's text is one of ``NOISE``."""
    return bool(_NOISE_TEXT.search(text))


class DropNoise(logging.Filter):
    """Drops the ``py.warnings`` records (warnings that logging captured) of ``NOISE``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


def silence_noise() -> None:
    """Ignore the warnings listed in ``NOISE``, also where a library forces them on (MLflow
    wraps its class checks in ``simplefilter("once")``): filtered, not shown, not logged."""
    for message, category in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    captured = logging.getLogger("py.warnings")
    if not any(isinstance(f, DropNoise) for f in captured.filters):
        captured.addFilter(DropNoise())
    shown = warnings.showwarning
    if getattr(shown, "_drops_noise", False):
        return

    def showwarning(message: Any, *args: Any, **kwargs: Any) -> None:
        if not is_noise(str(message)):
            shown(message, *args, **kwargs)

    showwarning._drops_noise = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its bars are widgets, not text)."""
    return "ipykernel" in sys.modules


def bound_progress_rate(stream: TextIO | None = None, interval_s: float = PROGRESS_INTERVAL_S) -> bool:
    """Make every tqdm bar write at most once per ``interval_s`` when ``stream`` (stderr) is not
    a terminal, instead of ten times a second: a log file gets a line per interval, not
    thousands. Nested bars share line 0, since a lower line needs cursor-moving escape codes a
    log cannot show. A bar given its own ``mininterval`` keeps it. Returns whether it changed tqdm."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if (isatty is not None and isatty()) or in_notebook():
        return False
    from tqdm import std

    init = std.tqdm.__dict__["__init__"]
    if getattr(std.tqdm, "_aim_kedro_interval", None) == interval_s:
        return False
    func = init.func if isinstance(init, partialmethod) else init
    keywords = dict(init.keywords) if isinstance(init, partialmethod) else {}
    keywords.setdefault("mininterval", interval_s)  # TQDM_MININTERVAL, when set, wins
    keywords.setdefault("maxinterval", interval_s)
    keywords.setdefault("position", 0)
    std.tqdm.__init__ = partialmethod(func, **keywords)
    std.tqdm._aim_kedro_interval = interval_s
    return True


def quiet() -> None:
    """Everything above: called once per process by ``settings.py``."""
    silence_noise()
    bound_progress_rate()
