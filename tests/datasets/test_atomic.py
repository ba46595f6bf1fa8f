"""Atomic saves: a save killed half-way leaves no version that a later load would pick up."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl
import pytest
from kedro.io import Version

from aim_kedro.datasets.atomic import EagerPolarsDataset, JSONDataset, MatplotlibDataset

# Two saves of one entry get their own versions: Kedro's timestamps can repeat within a millisecond.
V1, V2 = "2026-01-01T00.00.00.000Z", "2026-01-01T00.00.00.001Z"


def test_parquet_round_trip_and_versions(tmp_path: Path) -> None:
    path = str(tmp_path / "t.parquet")
    EagerPolarsDataset(filepath=path, file_format="parquet", version=Version(None, V1)).save(pl.DataFrame({"a": [1]}))
    EagerPolarsDataset(filepath=path, file_format="parquet", version=Version(None, V2)).save(pl.DataFrame({"a": [2]}))
    loaded = EagerPolarsDataset(filepath=path, file_format="parquet", version=Version(None, None)).load()
    assert loaded["a"].to_list() == [2]
    assert len(list((tmp_path / "t.parquet").iterdir())) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_failed_json_save_leaves_no_version(tmp_path: Path) -> None:
    path = str(tmp_path / "r.json")
    JSONDataset(filepath=path, version=Version(None, V1)).save({"ok": 1})
    with pytest.raises(Exception, match="not JSON serializable"):
        JSONDataset(filepath=path, version=Version(None, V2)).save({"bad": object()})
    assert JSONDataset(filepath=path, version=Version(None, None)).load() == {"ok": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_matplotlib_png_is_written(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    MatplotlibDataset(filepath=str(tmp_path / "p.png"), version=Version(None, None)).save(fig)
    (png,) = list((tmp_path / "p.png").glob("*/p.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
