"""A pool downloaded by the real img2dataset from a loopback server, two runs under one root,
curated over http://127.0.0.1: every attempted sample accounted for, url carried, dfn_uids."""
# img2dataset's own imports cost ~10 s of CPU per process (it starts a worker process too).

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import add_params, curation_catalog, curation_params, noise_png, tiny_curation_inputs
from kedro.runner import SequentialRunner
from loopback import serve
from PIL import Image

from aim_kedro.curation.index import IndexConfig, build_index
from aim_kedro.io.shards import ShardSet, sample_json
from aim_kedro.io.uids import from_datacomp
from aim_kedro.pipelines.curation import create_pipeline

pytestmark = pytest.mark.slow

IMG2DATASET = shutil.which("img2dataset", path=str(Path(sys.executable).parent))


def _images(root: Path, n: int) -> None:
    """n pictures of 64-95 px (PNG and JPEG), and a file that is not an image."""
    root.mkdir(parents=True)
    for i in range(n):
        image = Image.open(io.BytesIO(noise_png(i, 64 + i)))
        image.save(root / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=95)
    (root / "text.jpg").write_bytes(b"this is not an image")


def _download(url: str, ids: range, out: Path, work: Path) -> None:
    """One img2dataset run over pictures ``ids`` plus a 404 and a non-image."""
    listing = work / f"{out.name}.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for i in ids:
            name = f"{i}.jpg" if i % 2 else f"{i}.png"
            writer.writerow([f"{url}/images/{name}", f"a photo of thing {i}"])
        writer.writerow([f"{url}/images/missing.png", "a missing photo"])
        writer.writerow([f"{url}/images/text.jpg", "a photo that is text"])
    subprocess.run(
        [IMG2DATASET, "--url_list", str(listing), "--input_format", "csv", "--url_col", "url",
         "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
         "--resize_mode", "no", "--processes_count", "1", "--thread_count", "4",
         "--number_sample_per_shard", "8", "--retries", "0", "--enable_wandb", "False"],
        check=True, capture_output=True, timeout=300, cwd=work,
        env={**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
             "NO_ALBUMENTATIONS_UPDATE": "1"},
    )


def _stats(root: Path) -> dict[str, int]:
    total = {"count": 0, "failed_to_download": 0, "failed_to_resize": 0}
    for path in root.rglob("*_stats.json"):
        stats = json.loads(path.read_text())
        for name in total:
            total[name] += int(stats[name])
    return total


@pytest.mark.skipif(IMG2DATASET is None, reason="img2dataset (the dev extra) is not installed")
def test_img2dataset_runs_under_one_root_curated_over_http(tmp_path: Path) -> None:
    _images(tmp_path / "serve" / "images", 16)
    pool = tmp_path / "serve" / "pool"
    with serve(tmp_path / "serve") as (url, _):
        _download(url, range(16), pool / "run1", tmp_path)
        # A second run of the same list under the same root: its keys and shard names repeat
        # the first's (one real run of the tool keeps the test's CPU time low).
        shutil.copytree(pool / "run1", pool / "run2")
        stats = _stats(pool)
        assert stats == {"count": 36, "failed_to_download": 2, "failed_to_resize": 2}

        inputs = tiny_curation_inputs(tmp_path / "inputs")
        catalog = curation_catalog(tmp_path, {**inputs, "raw_pool": f"{url}/pool/"})
        add_params(catalog, "curation", curation_params(keep_fraction=0.5))
        SequentialRunner().run(create_pipeline(), catalog)
        subset = list(catalog.load("dfn_subset"))

    manifest = catalog.load("pool_manifest")
    reasons = manifest.group_by("reject_reason").len()
    counts = dict(reasons.iter_rows())
    assert manifest.height == stats["count"]  # the funnel starts at what was attempted
    assert counts["failed_download"] == stats["failed_to_download"]
    assert counts["failed_resize"] == stats["failed_to_resize"]
    assert "duplicate_uid" not in counts and manifest["uid"].n_unique() == manifest.height
    assert {s.split("/")[0] for s in manifest["shard"]} == {"run1", "run2"}
    assert manifest["url"].null_count() == 0
    failed = manifest.filter(pl.col("reject_reason") == "failed_download").row(0, named=True)
    assert failed["url"].endswith("/images/missing.png") and "404" in failed["reject_detail"]
    report = catalog.load("curation_report")
    assert report["funnel"]["input"] == stats["count"]

    kept = manifest.filter(pl.col("kept"))
    dfn = catalog.load("dfn_manifest")
    assert sorted(dfn["uid"]) == sorted(kept["uid"]) and dfn["url"].null_count() == 0
    urls = dict(zip(dfn["uid"], dfn["url"], strict=True))
    assert {sample_json(s)["uid"]: sample_json(s)["url"] for s in subset} == urls
    uids = catalog.load("dfn_uids")
    assert uids.dtype == np.dtype("u8,u8") and sorted(from_datacomp(uids)) == sorted(kept["uid"])

    local, _ = build_index(ShardSet.open(str(tmp_path / "serve" / "pool")), IndexConfig(),
                           progress=False)
    remote = catalog.load("pool_index")
    columns = ["uid", "shard", "key", "sha256_pixels", "url", "reject_reason"]
    assert local.select(columns).equals(remote.select(columns))
