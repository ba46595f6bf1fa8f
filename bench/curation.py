"""Curation throughput per stage and end to end, and peak memory at two pool sizes.

For each pool size a synthetic pool (the sample pipeline's renderers: coloured digits, photo
crops, faces pasted into scenes, ~5% exact and near duplicates; JPEG + caption + uid) is written
as webdataset shards with ``aim_kedro.io.shards.write_shards``. A FRESH subprocess then
runs the real ``curation`` pipeline on it: the nodes of ``aim_kedro.pipelines.curation``, in
the pipeline's order, on a ``DataCatalog`` built from ``conf/base`` (the project's datasets,
versioned, with their file paths moved into a temp folder) and the project's
``params:curation``. Each node's inputs are loaded from the catalog and its outputs saved to it,
as Kedro's SequentialRunner does; the time of a stage is load + run + save, so the subset stage
includes the shard writer that consumes the subset stream. The filtering network (a tiny
open_clip CLIP trained from scratch) is trained on synthetic trusted pairs and scores the pool.
``probe_test`` is the sample pipeline's digits test set (eval-leak check); there is no truth
table (an empty ``sample_truth``).

Peak memory is the subprocess's peak RSS per stage (Linux: ``VmHWM`` after resetting the mark
through ``/proc/self/clear_refs`` before each stage; elsewhere the running
``resource.getrusage(...).ru_maxrss``). The pipeline streams shard by shard, so the peak should
not grow with the pool; the summary gives the peak over the whole run and over the stages that
see the pool (all but the filtering-network training, whose cost does not depend on the pool).
CPU seconds per 10k items are the subprocess's user + system time per stage.

Ray: after the local run of the largest pool (the smaller one with ``--quick``), the same
subprocess starts a local Ray of ``--ray-cpus`` CPUs (timed apart) and runs the four per-shard nodes again with
``curation.executor.kind: ray`` (as ``kedro run -e ray`` does), on the same inputs loaded from
the catalog, saving to a second catalog: a second table gives items/s of each node local vs Ray
on this machine (the engine's overhead), and whether the Ray outputs equal the local ones.
``--no-ray`` skips it.

    .venv/bin/python bench/curation.py --quick                   # 200 and 400 images at 64 px
    .venv/bin/python bench/curation.py --pool-size 10000 --image-size 256
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _common import (
    current_peak_rss_mib,
    environment_line,
    load_average,
    peak_rss_mib,
    print_table,
    reset_peak_rss,
    summary,
)

REPO = Path(__file__).resolve().parents[1]
EXTERNAL_INPUTS = ("raw_pool", "trusted_pairs", "probe_test", "sample_truth")
RESULT_PREFIX = "BENCH_RESULT "
RAY_STAGES = ("build_pool_index", "score_pool", "detect_faces", "write_dfn_subset")

# What a stage's images/s counts: the pool by default, else (what, how to get the count).
STAGE_UNITS = {
    "train_filter_network": "trusted pairs",
    "score_pool": "scored samples",
    "detect_faces": "kept samples",
    "write_dfn_subset": "kept samples",
    "check_dfn_subset": "written samples",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=None,
                        help="the larger pool; the smaller is half of it (default 10000, "
                             "quick 400)")
    parser.add_argument("--pool-sizes", default=None,
                        help="comma-separated pool sizes instead of --pool-size (e.g. 2000,8000)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the pool's JPEGs in px (default 256, quick 64)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="shard size of the generated pools (default 1000, quick 100)")
    parser.add_argument("--trusted-pairs", type=int, default=None,
                        help="synthetic trusted pairs for the filtering network (default 2000, "
                             "quick 128)")
    parser.add_argument("--filter-epochs", type=int, default=None,
                        help="override curation.filter_network.epochs (default: the project's "
                             "value; quick 1)")
    parser.add_argument("--filter-steps", type=int, default=None,
                        help="override curation.filter_network.steps (default: the project's "
                             "value; quick 1)")
    parser.add_argument("--no-ray", action="store_true",
                        help="skip the Ray re-run of the per-shard nodes")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="CPUs of the local Ray (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show the pipeline's logs")
    parser.add_argument("--quick", action="store_true",
                        help="pools of 200 and 400 images at 64 px, 1 filter-network step, "
                             "Ray on the smaller pool (< 1 min on 2 cores)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pool_sizes:
        args.sizes = sorted(int(s) for s in args.pool_sizes.split(","))
    else:
        big = args.pool_size or (400 if args.quick else 10_000)
        args.sizes = [max(1, big // 2), big]
    args.ray_pool = args.sizes[0] if args.quick else args.sizes[-1]
    args.image_size = args.image_size or (64 if args.quick else 256)
    args.samples_per_shard = args.samples_per_shard or (100 if args.quick else 1000)
    args.trusted_pairs = args.trusted_pairs or (128 if args.quick else 2000)
    if args.quick:
        args.filter_epochs = args.filter_epochs or 1
        args.filter_steps = args.filter_steps or 1
    return args


# --------------------------------------------------------------------------------------------
# Subprocess side: run the pipeline's nodes on a real catalog and report times and memory.
# --------------------------------------------------------------------------------------------


def _param(params: dict[str, Any], name: str) -> Any:
    """The value of ``params:a.b.c``."""
    value: Any = params
    for part in name.removeprefix("params:").split("."):
        value = value[part]
    return value


def _size(value: Any) -> int | None:
    height = getattr(value, "height", None)
    return int(height) if isinstance(height, int) else None


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run every node of the curation pipeline; return per-node seconds, sizes and peak RSS."""
    warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
    logging.basicConfig(level=logging.INFO if spec["verbose"] else logging.WARNING)
    from kedro.config import OmegaConfigLoader
    from kedro.io import DataCatalog

    from aim_kedro.pipelines.curation import create_pipeline

    rss_imports = peak_rss_mib()
    conf = OmegaConfigLoader(str(REPO / "conf"), base_env="base", default_run_env="base")
    params = dict(conf["parameters"])
    params["curation"] = {**params["curation"], "progress": False}
    overrides = {key: spec[f"filter_{key}"] for key in ("epochs", "steps")
                 if spec[f"filter_{key}"] is not None}
    params["curation"]["filter_network"] = {**params["curation"]["filter_network"], **overrides}
    pipeline = create_pipeline()

    def make_catalog(out: Path) -> DataCatalog:
        entries: dict[str, dict[str, Any]] = {}
        for name in sorted(n for n in pipeline.datasets() if not n.startswith("params:")):
            entry = dict(conf["catalog"][name])
            if name in EXTERNAL_INPUTS:
                entry.update(filepath=spec["inputs"][name], versioned=False)
            else:
                entry["filepath"] = str(out / entry["filepath"])
            entries[name] = entry
        return DataCatalog.from_config(entries)

    catalog = make_catalog(Path(spec["out_dir"]))
    stages = []
    for node in pipeline.nodes:
        per_stage = reset_peak_rss()
        cpu_start = cpu_seconds()
        start = time.perf_counter()
        inputs = {
            name: _param(params, name) if name.startswith("params:") else catalog.load(name)
            for name in node.inputs
        }
        loaded = time.perf_counter()
        outputs = node.run(inputs)
        ran = time.perf_counter()
        for name in node.outputs:
            catalog.save(name, outputs[name])
        saved = time.perf_counter()
        stats = {
            name: value for name, value in outputs.items()
            if name.endswith("_stats") and isinstance(value, dict)
        }
        sizes = {name: n for name, value in outputs.items() if (n := _size(value)) is not None}
        del inputs, outputs
        gc.collect()
        stages.append({
            "node": node.name, "load": loaded - start, "run": ran - loaded, "save": saved - ran,
            "cpu": cpu_seconds() - cpu_start, "sizes": sizes, "stats": json.loads(json.dumps(stats, default=str)),
            "stage_peak_rss_mib": current_peak_rss_mib() if per_stage else peak_rss_mib(),
        })
    # Resetting the mark also resets ru_maxrss, so the run's peak is the largest stage peak.
    overall = max([rss_imports] + [s["stage_peak_rss_mib"] or 0.0 for s in stages])
    on_ray = None
    if spec["ray"]:
        on_ray = run_ray_stages(spec, pipeline, params, catalog,
                                make_catalog(Path(spec["out_dir"]) / "ray"))
    return {"rss_after_imports_mib": rss_imports, "stages": stages, "peak_rss_mib": overall,
            "per_stage_peaks": per_stage, "ray": on_ray}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _same_output(new: Any, old: Any) -> bool | None:
    """Whether a Ray output equals the local one (tables; shard folders sample by sample)."""
    if hasattr(new, "equals") and hasattr(old, "equals"):
        return bool(new.equals(old))
    if hasattr(new, "shards") and hasattr(old, "shards"):
        return [sorted(s.items()) for s in new] == [sorted(s.items()) for s in old]
    return None


def run_ray_stages(
    spec: dict[str, Any], pipeline: Any, params: dict[str, Any], catalog: Any, ray_catalog: Any
) -> dict[str, Any]:
    """Start a local Ray, then run the per-shard nodes with the Ray executor on the inputs of
    ``catalog`` (the local run's), saving to ``ray_catalog``; times and output checks."""
    import ray

    from aim_kedro.curation.executors import ExecutorConfig
    from aim_kedro.curation.ray_executor import ensure_ray

    executor = {"kind": "ray", "num_cpus": spec["ray_cpus"]}
    start = time.perf_counter()
    ensure_ray(ExecutorConfig(**executor))
    ray_start = time.perf_counter() - start
    ray_params = {**params, "curation": {**params["curation"], "executor": executor}}
    stages = []
    for node in pipeline.nodes:
        if node.name not in RAY_STAGES:
            continue
        cpu_start = cpu_seconds()
        start = time.perf_counter()
        inputs = {
            name: _param(ray_params, name) if name.startswith("params:") else catalog.load(name)
            for name in node.inputs
        }
        outputs = node.run(inputs)
        for name in node.outputs:
            ray_catalog.save(name, outputs[name])
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
        checks = {name: _same_output(ray_catalog.load(name), catalog.load(name))
                  for name in node.outputs if not name.endswith("_stats")}
        stats = {name: value for name, value in outputs.items() if name.endswith("_stats")}
        stages.append({
            "node": node.name, "load": 0.0, "run": seconds, "save": 0.0, "cpu": cpu,
            "sizes": {name: n for name, value in outputs.items()
                      if (n := _size(value)) is not None},
            "stats": json.loads(json.dumps(stats, default=str)),
            "identical": all(v for v in checks.values() if v is not None),
        })
    ray.shutdown()
    return {"ray_start_s": ray_start, "cpus": spec["ray_cpus"] or os.cpu_count(),
            "stages": stages}


# --------------------------------------------------------------------------------------------
# Parent side: write pools, start one fresh subprocess per pool size, print the tables.
# --------------------------------------------------------------------------------------------


def write_inputs(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Pools of each size, trusted pairs, probe_test and an empty truth table under ``tmp``."""
    import polars as pl
    from _common import synthetic_pool
    from kedro.config import OmegaConfigLoader

    from aim_kedro.io.shards import write_shards
    from aim_kedro.pipelines.sample.nodes import build_probe_sets

    warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
    start = time.perf_counter()
    pools = {}
    for n in args.sizes:
        path = tmp / f"pool_{n}"
        write_shards(synthetic_pool(n, args.image_size, args.seed), str(path),
                     samples_per_shard=args.samples_per_shard, prefix="pool")
        pools[n] = str(path)
    write_shards(
        synthetic_pool(args.trusted_pairs, args.image_size, args.seed + 1,
                       duplicate_fraction=0.0, face_fraction=0.0),
        str(tmp / "trusted_pairs"), samples_per_shard=1000, prefix="trusted",
    )
    sample_params = OmegaConfigLoader(str(REPO / "conf"), base_env="base",
                                      default_run_env="base")["parameters"]["sample"]
    _, probe_test = build_probe_sets(dict(sample_params))
    write_shards(probe_test, str(tmp / "probe_test"), samples_per_shard=1000, prefix="probe")
    truth = tmp / "sample_truth.parquet"
    pl.DataFrame(schema={"uid": pl.String, "kind": pl.String}).write_parquet(truth)
    return {
        "pools": pools,
        "trusted_pairs": str(tmp / "trusted_pairs"),
        "probe_test": str(tmp / "probe_test"),
        "probe_test_size": len(probe_test),
        "sample_truth": str(truth),
        "seconds": time.perf_counter() - start,
    }


def run_pool(args: argparse.Namespace, inputs: dict[str, Any], n: int, tmp: Path) -> dict:
    """Run the pipeline on the pool of ``n`` images in a fresh interpreter; its result dict."""
    spec = {
        "verbose": args.verbose,
        "ray": not args.no_ray and n == args.ray_pool,
        "ray_cpus": args.ray_cpus,
        "filter_epochs": args.filter_epochs,
        "filter_steps": args.filter_steps,
        "out_dir": str(tmp / f"out_{n}"),
        "inputs": {
            "raw_pool": inputs["pools"][n],
            "trusted_pairs": inputs["trusted_pairs"],
            "probe_test": inputs["probe_test"],
            "sample_truth": inputs["sample_truth"],
        },
    }
    spec_path = tmp / f"spec_{n}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = tmp / f"worker_{n}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=subprocess.PIPE, stderr=None if args.verbose else log, text=True,
            check=False, cwd=str(REPO),
        )
    if done.returncode != 0:
        tail = "" if args.verbose else log_path.read_text()[-4000:]
        raise SystemExit(
            f"curation worker for pool {n} failed with exit code {done.returncode}\n{tail}"
        )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise SystemExit(f"curation worker for pool {n} printed no result:\n{done.stdout[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = time.perf_counter() - start
    return result


def stage_count(stage: dict[str, Any], pool: int, trusted: int) -> int:
    """How many items a stage's images/s divides by (see STAGE_UNITS)."""
    name, sizes, stats = stage["node"], stage["sizes"], stage["stats"]
    if name == "train_filter_network":
        return trusted
    if name == "score_pool":
        return sizes.get("clip_scores", pool)
    if name == "detect_faces":
        return int(stats.get("curation_face_stats", {}).get("images", sizes.get("face_boxes", 0)))
    if name == "write_dfn_subset":
        return sizes.get("dfn_manifest", 0)
    if name == "check_dfn_subset":
        return int(stats.get("curation_subset_stats", {}).get("written", 0))
    return pool


def compare_ray(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """Print items/s of the per-shard nodes local vs Ray at ``args.ray_pool``; the summary clause."""
    big = args.ray_pool
    on_ray = result["ray"]
    local = {s["node"]: s for s in result["stages"]}
    rows = []
    for stage in on_ray["stages"]:
        mine = local[stage["node"]]
        count = stage_count(mine, big, args.trusted_pairs)
        s_local = mine["load"] + mine["run"] + mine["save"]
        s_ray = stage["run"]
        rows.append({"stage": stage["node"], "items": count, "s_local": s_local, "s_ray": s_ray,
                     "ips_local": count / s_local, "ips_ray": count / s_ray,
                     "ratio": s_local / s_ray, "same": "yes" if stage["identical"] else "NO"})
    s_local = sum(r["s_local"] for r in rows)
    s_ray = sum(r["s_ray"] for r in rows)
    same = all(r["same"] == "yes" for r in rows)
    rows.append({"stage": "the four per-shard nodes", "items": big, "s_local": s_local,
                 "s_ray": s_ray, "ips_local": big / s_local, "ips_ray": big / s_ray,
                 "ratio": s_local / s_ray, "same": "yes" if same else "NO"})
    print(f"\n## local vs Ray at {big} images: the per-shard nodes again on the same inputs, "
          f"Ray Data on a local Ray of {on_ray['cpus']} CPUs (started in "
          f"{on_ray['ray_start_s']:.1f} s, not counted)")
    print_table(rows, [
        ("stage", "stage", ""), ("items", "items", "d"), ("s_local", "s local", ".2f"),
        ("ips_local", "items/s local", ".1f"), ("s_ray", "s ray", ".2f"),
        ("ips_ray", "items/s ray", ".1f"), ("ratio", "ray speed / local", ".2f"),
        ("same", "ray output = local", ""),
    ])
    return (f"per-shard nodes at {big}: ray ({on_ray['cpus']} CPUs) {big / s_ray:.1f} vs local "
            f"{big / s_local:.1f} img/s ({s_local / s_ray:.2f}x, outputs "
            f"{'identical' if same else 'DIFFER'}; Ray start {on_ray['ray_start_s']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(Path(args.worker).read_text()))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    print(environment_line())
    with tempfile.TemporaryDirectory(prefix="bench_curation_") as tmp_name:
        tmp = Path(tmp_name)
        inputs = write_inputs(args, tmp)
        print(f"# pools {', '.join(map(str, args.sizes))} images at {args.image_size} px, "
              f"{args.samples_per_shard} per shard | {args.trusted_pairs} trusted pairs, "
              f"filter-network epochs {args.filter_epochs or 'as conf/base'}, steps "
              f"{args.filter_steps or 'as conf/base'} | probe_test "
              f"{inputs['probe_test_size']} | inputs written in {inputs['seconds']:.1f} s")
        results = {}
        for n in args.sizes:
            results[n] = run_pool(args, inputs, n, tmp)
            print(f"# pool {n}: worker done in {results[n]['wall_s']:.1f} s (load average "
                  f"{load_average()})", flush=True)

    rows = []
    nodes = [s["node"] for s in results[args.sizes[0]]["stages"]]
    for i, node in enumerate(nodes):
        row: dict[str, Any] = {"stage": node, "counts": STAGE_UNITS.get(node, "pool samples")}
        for n in args.sizes:
            stage = results[n]["stages"][i]
            seconds = stage["load"] + stage["run"] + stage["save"]
            count = stage_count(stage, n, args.trusted_pairs)
            row[f"n{n}"] = count
            row[f"s{n}"] = seconds
            row[f"ips{n}"] = count / seconds if seconds > 0 else None
            row[f"rss{n}"] = stage["stage_peak_rss_mib"]
            row[f"cpu{n}"] = stage["cpu"] / count * 10_000 if count else None
        rows.append(row)
    totals: dict[str, Any] = {"stage": "end to end", "counts": "pool samples"}
    no_train: dict[str, Any] = {"stage": "end to end w/o filter training", "counts": "pool samples"}
    for n in args.sizes:
        stages = results[n]["stages"]
        total = sum(s["load"] + s["run"] + s["save"] for s in stages)
        train = sum(s["load"] + s["run"] + s["save"] for s in stages
                    if s["node"] == "train_filter_network")
        totals.update({f"n{n}": n, f"s{n}": total, f"ips{n}": n / total,
                       f"rss{n}": results[n]["peak_rss_mib"]})
        no_train.update({f"n{n}": n, f"s{n}": total - train, f"ips{n}": n / (total - train)})
    rows += [totals, no_train]

    columns = [("stage", "stage", ""), ("counts", "counts", "")]
    for n in args.sizes:
        columns += [(f"n{n}", f"items @{n}", "d"), (f"s{n}", f"s @{n}", ".2f"),
                    (f"ips{n}", f"items/s @{n}", ".1f"), (f"cpu{n}", f"CPU s/10k @{n}", ".0f"),
                    (f"rss{n}", f"stage peak RSS MiB @{n}", ".0f")]
    print("\n## curation stages (load + run + save per node, real catalog datasets; CPU s per "
          "10k items: the process's user + system time)")
    print_table(rows, columns)
    engine = compare_ray(args, results[args.ray_pool]) if results[args.ray_pool]["ray"] else ""

    small, big = args.sizes[0], args.sizes[-1]

    def pool_peak(n: int) -> float:
        return max(s["stage_peak_rss_mib"] or 0.0 for s in results[n]["stages"]
                   if s["node"] != "train_filter_network")

    rss_small, rss_big = results[small]["peak_rss_mib"], results[big]["peak_rss_mib"]
    pool_small, pool_big = pool_peak(small), pool_peak(big)
    print("\n# peak RSS after imports: " + ", ".join(
        f"{results[n]['rss_after_imports_mib']:.0f} MiB @{n}" for n in args.sizes)
        + " | peak RSS of the run: " + ", ".join(
        f"{results[n]['peak_rss_mib']:.0f} MiB @{n}" for n in args.sizes)
        + ("" if results[big]["per_stage_peaks"] else " (per-stage peaks unavailable: the "
           "column shows the running peak)"))
    summary(
        f"curation end to end {totals[f'ips{small}']:.1f} / {totals[f'ips{big}']:.1f} img/s at "
        f"{small} / {big} images ({args.image_size} px; w/o filter training "
        f"{no_train[f'ips{small}']:.1f} / {no_train[f'ips{big}']:.1f}) | peak RSS "
        f"{rss_small:.0f} -> {rss_big:.0f} MiB ({(rss_big - rss_small) / rss_small:+.1%}), "
        f"pool stages {pool_small:.0f} -> {pool_big:.0f} MiB "
        f"({(pool_big - pool_small) / pool_small:+.1%}) for {big / small:.1f}x the pool"
        + (f" | {engine}" if engine else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
