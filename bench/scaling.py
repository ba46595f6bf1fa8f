"""The scaling pipeline on the sample: wall and CPU time, the results and the paper's findings.

A FRESH subprocess runs ``kedro run --pipelines scaling`` on a temporary copy of the project
(conf/base, pyproject.toml, empty data/, logs/ and src/; the package is this checkout's src) whose conf/local/catalog.yml points
``dfn_subset``, ``probe_train`` and ``probe_test`` at this checkout's data (their newest
versions: ``kedro run --pipelines sample,curation`` makes them; with ``--make-inputs`` the
copy makes its own first, timed apart). The time is the subprocess's: wall clock and user +
system CPU seconds of it and its children (DataLoader workers included); the lead's rule of
thumb on 2 quiet cores is wall ~ CPU / 2 when the work uses both cores.

Default: the project's grid (``scaling.grid``, the sample's 4 capacities x 3 data sizes x 2
seeds). ``--quick``: a grid of 2 capacities x 2 data sizes x 1 seed and 40 steps, written to the
copy's conf/local/parameters_scaling.yml (the pipeline's shape follows). The tables are the
results (means over seeds) and the fits of ``scaling_summary``; the last line the findings.

    .venv/bin/python bench/scaling.py --quick
    .venv/bin/python bench/scaling.py               # the default grid: the README's figures
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from _common import environment_line, print_table, summary

REPO = Path(__file__).resolve().parents[1]
INPUTS = {"dfn_subset": "data/05_model_input/dfn_subset",
          "probe_train": "data/01_raw/probe_train", "probe_test": "data/01_raw/probe_test"}
DATA_LAYERS = ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input",
               "06_models", "07_model_output", "08_reporting")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 capacities x 2 data sizes x 1 seed, 40 steps")
    parser.add_argument("--make-inputs", action="store_true",
                        help="run the sample and curation pipelines in the copy first")
    parser.add_argument("--keep", action="store_true", help="keep the project copy and print it")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the run (torch threads); default: torch's")
    return parser.parse_args(argv)


def newest(folder: Path) -> bool:
    """Whether a versioned folder holds at least one saved version."""
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


def project_copy(root: Path, quick: bool, own_inputs: bool) -> Path:
    """conf/base, pyproject.toml and an empty data tree at ``root``; the inputs from this
    checkout (unless the copy makes its own) and, with ``quick``, a small grid."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    if (REPO / ".telemetry").exists():
        shutil.copy(REPO / ".telemetry", root / ".telemetry")
    for folder in ("src", "logs", *(f"data/{layer}" for layer in DATA_LAYERS)):
        (root / folder).mkdir(parents=True)
    if not own_inputs:
        base = yaml.safe_load((REPO / "conf/base/catalog.yml").read_text())
        base.update(yaml.safe_load((REPO / "conf/base/catalog_curation.yml").read_text()))
        local = {name: {**base[name], "filepath": str(REPO / path)} for name, path in INPUTS.items()}
        (root / "conf/local/catalog.yml").write_text(yaml.safe_dump(local))
    if quick:
        sample = yaml.safe_load((REPO / "conf/base/parameters_scaling.yml").read_text())
        grid = sample["scaling"]["grids"]["sample"]
        quick_grid = {
            "capacities": {name: grid["capacities"][name] for name in ("w32", "w64")},
            "data_sizes": {"d25": 0.25, "d100": 1.0}, "seeds": [0], "steps": 40,
            "pretraining": {**grid["pretraining"],
                            "train": {**grid["pretraining"]["train"], "val_every": 20}},
            "evaluation": grid["evaluation"],
        }
        (root / "conf/local/parameters_scaling.yml").write_text(
            yaml.safe_dump({"scaling": {"grid": "quick", "grids": {"quick": quick_grid}}}))
    return root


def kedro_run(root: Path, pipelines: str, threads: int | None) -> tuple[float, float, int]:
    """Run ``kedro run --pipelines`` in ``root``: (wall seconds, CPU seconds, exit code)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "KEDRO_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    kedro = Path(sys.executable).with_name("kedro")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(root / "kedro_run.log", "w") as log:
        code = subprocess.call([str(kedro), "run", "--pipelines", pipelines], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, code


def newest_file(root: Path, relative: str) -> Path:
    """The newest version of a versioned file entry of the copy."""
    folder = root / relative
    return sorted(folder.iterdir())[-1] / folder.name


def results_rows(results: pl.DataFrame) -> list[dict[str, Any]]:
    """Means over seeds of each capacity x data size, in grid order."""
    low_shot = next(c for c in results.columns if c.startswith("attentive_") and "shot" in c)
    table = (results.group_by("capacity", "data")
             .agg(pl.col("trunk_params", "train_images", "epochs", "flops_per_image").first(),
                  pl.len().alias("seeds"),
                  pl.col("final_val_loss").mean().alias("loss"),
                  (pl.col("final_val_loss").max() - pl.col("final_val_loss").min()).alias("spread"),
                  pl.col(low_shot).mean().alias("low_shot"),
                  pl.col("attentive_top1").mean().alias("attentive"),
                  pl.col("linear_top1").mean().alias("linear"),
                  pl.col(f"random_{low_shot}").mean().alias("random_low_shot"))
             .sort("train_images", "trunk_params"))
    return [{**row, **{k: 100 * row[k] for k in ("low_shot", "attentive", "linear",
                                                  "random_low_shot")},
             "mflops": row["flops_per_image"] / 1e6} for row in table.iter_rows(named=True)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [name for name, path in INPUTS.items() if not newest(REPO / path)]
    if missing and not args.make_inputs:
        print(f"{', '.join(missing)} not in {REPO / 'data'}: run `kedro run --pipelines "
              "sample,curation` first, or pass --make-inputs", file=sys.stderr)
        return 2
    print(environment_line())
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    root = project_copy(tmp / "project", args.quick, args.make_inputs)
    if args.make_inputs:
        wall, cpu, code = kedro_run(root, "sample,curation", args.threads)
        print(f"# inputs made in the copy: {wall:.0f} s wall, {cpu:.0f} CPU-s (not counted)")
        if code:
            print(f"sample/curation failed: see {root / 'kedro_run.log'}", file=sys.stderr)
            return code
    wall, cpu, code = kedro_run(root, "scaling", args.threads)
    if code:
        print(f"kedro run --pipelines scaling failed (exit {code}): see {root / 'kedro_run.log'}",
              file=sys.stderr)
        return code
    results = pl.read_parquet(newest_file(root, "data/08_reporting/scaling_results.parquet"))
    scaling = json.loads(newest_file(root, "data/08_reporting/scaling_summary.json").read_text())
    print_table(results_rows(results), [
        ("capacity", "capacity", ""), ("trunk_params", "trunk params", ","),
        ("mflops", "MFLOPs/img", ".2f"), ("data", "data", ""), ("train_images", "images", ","),
        ("epochs", "epochs", ".1f"), ("seeds", "seeds", ""), ("loss", "val loss", ".4f"),
        ("spread", "seed spread", ".4f"), ("low_shot", "att. 10-shot %", ".1f"),
        ("attentive", "att. all %", ".1f"), ("linear", "linear %", ".1f"),
        ("random_low_shot", "random 10-shot %", ".1f"),
    ])
    print()
    fits = [{"fit": f"loss vs params at {data}", **fit}
            for data, fit in scaling["loss_vs_params"].items()]
    fits += [{"fit": f"loss vs images of {cap}", **fit} for cap, fit in scaling["loss_vs_data"].items()]
    print_table(fits, [("fit", "power law", ""), ("exponent", "exponent", ".4f"),
                       ("r2", "R²", ".3f"), ("n", "points", "")])
    print()
    joint = scaling["loss_joint"]
    findings = scaling["findings"]
    headline = scaling["headline_probe"]
    rho = scaling["spearman"][headline]["rho"]
    print(f"joint fit: loss ~ N^-{joint['params_exponent']:.4f} D^-{joint['data_exponent']:.4f} "
          f"(R² {joint['r2']:.3f}); Spearman(val loss, top-1) over {results.height} runs: "
          + ", ".join(f"{probe} {entry['rho']:.2f}" for probe, entry in scaling["spearman"].items()
                      if entry["rho"] is not None))
    if args.keep:
        print(f"# the project copy: {root}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    grid = scaling["grid"]
    largest = findings["largest_data"]
    summary(
        f"scaling: {grid['runs']} runs ({len(grid['capacities'])} capacities x "
        f"{len(grid['data_sizes'])} data sizes x {len(grid['seeds'])} seed(s), "
        f"{'/'.join(map(str, scaling['steps']))} equal steps) in {wall / 60:.1f} min wall, "
        f"{cpu:.0f} CPU-s (CPU/2 {cpu / 120:.1f} min); at {largest} loss falls with capacity: "
        f"{'yes' if findings['loss_falls_with_capacity'] else 'no ' + str(findings['exceptions'])}"
        f", exponent {scaling['loss_vs_params'][largest]['exponent']:.3f}; {headline} largest "
        f"{100 * findings[f'{headline}_largest']:.1f}% vs smallest "
        f"{100 * findings[f'{headline}_smallest']:.1f}%; Spearman "
        + ("n/a" if rho is None else f"{rho:.2f}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
