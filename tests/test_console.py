"""Quiet runs: noise warnings are dropped wherever they are shown, and progress bars write at a
bounded rate when the output is not a terminal."""

from __future__ import annotations

import io
import logging
import time
import warnings

import pytest
from tqdm import std

from aim_kedro.console import DropNoise, bound_progress_rate, is_noise, silence_noise

MLFLOW_NOISE = ("\x1b[33mAdd type hints to the `predict` method to enable data validation and "
                "automatic signature inference during model logging.\x1b[0m")


def test_noise_is_dropped_even_where_a_library_forces_warnings_on(monkeypatch) -> None:
    """MLflow shows its warning under ``simplefilter("once")``, past any filter: it is dropped
    where warnings are shown."""
    seen: list[str] = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: seen.append(str(message)))
    silence_noise()
    warnings.showwarning(MLFLOW_NOISE, UserWarning, "mlflow/x.py", 1)
    warnings.showwarning("a warning that matters", UserWarning, "x.py", 2)
    assert seen == ["a warning that matters"]


def test_noise_is_dropped_from_captured_warnings_in_the_log() -> None:
    silence_noise()
    captured = logging.getLogger("py.warnings")
    assert any(isinstance(f, DropNoise) for f in captured.filters)
    record = logging.LogRecord("py.warnings", logging.WARNING, "x.py", 1,
                               f"x.py:1: UserWarning: {MLFLOW_NOISE}", None, None)
    assert not captured.filter(record)
    assert is_noise("register_new_resolver() is deprecated and will be removed")
    assert not is_noise("resume checkpoint last.pt is unreadable")


@pytest.fixture
def restore_tqdm():
    """tqdm's class as it was before the test."""
    saved = {k: std.tqdm.__dict__[k] for k in ("__init__", "_aim_kedro_interval")
             if k in std.tqdm.__dict__}
    yield
    std.tqdm.__init__ = saved["__init__"]
    if "_aim_kedro_interval" in saved:
        std.tqdm._aim_kedro_interval = saved["_aim_kedro_interval"]
    elif "_aim_kedro_interval" in std.tqdm.__dict__:
        del std.tqdm._aim_kedro_interval


def test_progress_bars_write_at_a_bounded_rate_in_a_log_file(restore_tqdm) -> None:
    unbounded = io.StringIO()
    for _ in std.tqdm(range(300), file=unbounded, mininterval=0, desc="work"):
        time.sleep(0.002)
    bounded = io.StringIO()
    assert bound_progress_rate(bounded, interval_s=3600.0)
    for _ in std.tqdm(range(300), file=bounded, desc="work"):
        time.sleep(0.002)
    assert unbounded.getvalue().count("\r") > 100
    assert bounded.getvalue().count("\r") <= 3  # the start, the end, and at most one in between
    assert "300/300" in bounded.getvalue()


def test_nested_bars_in_a_log_file_write_no_cursor_escapes(restore_tqdm) -> None:
    log = io.StringIO()
    assert bound_progress_rate(log, interval_s=3600.0)
    with std.tqdm(total=2, file=log, desc="outer") as outer:
        for _ in range(2):
            for _ in std.tqdm(range(5), file=log, leave=False, desc="inner"):
                pass
            outer.update()
    assert "inner" in log.getvalue() and "2/2" in log.getvalue()
    assert "\x1b[" not in log.getvalue()


def test_a_terminal_keeps_live_progress_bars(restore_tqdm) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not bound_progress_rate(Terminal(), interval_s=3600.0)
