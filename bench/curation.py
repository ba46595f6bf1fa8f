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
see the pool (all but ``TRAINING_STAGES``: the filtering network's and the copy descriptor's
training, whose cost does not grow with the pool).
CPU seconds per 10k items are the subprocess's user + system time per stage.

Ray: after the local run of the largest pool (the smaller one with ``--quick``), the same
subprocess starts a local Ray of ``--ray-cpus`` CPUs (timed apart) and runs the four per-shard nodes again with
``curation.executor.kind: ray`` (as ``kedro run -e ray`` does), on the same inputs loaded from
the catalog, saving to a second catalog: a second table gives items/s of each node local vs Ray
on this machine (the engine's overhead), and whether the Ray outputs equal the local ones.
``--no-ray`` skips it.

Own CPU: the process's CPU per stage minus what model forward passes took (torch modules through
global module hooks; dlib's CNN face detector, onnxruntime and YuNet through wrappers), per pool
image, with every stage in the one process (``curation.executor.workers: 1``), beside the decode
floor of the same run (Pillow decode + one bicubic resize of the same JPEGs); the last line is
exactly
``curation cpu X img/s/core excluding inference; floor F img/s/core; ratio R``.

    .venv/bin/python bench/curation.py --quick                   # 200 and 400 images at 64 px
    .venv/bin/python bench/curation.py --pool-size 10000 --image-size 256
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _common import (
    ForwardCpu,
    cpu_seconds,
    current_peak_rss_mib,
    decode_floor,
    environment_line,
    load_average,
    param_value,
    peak_rss_mib,
    print_result,
    print_table,
    reset_peak_rss,
    summary,
    table_height,
    worker_result,
)
from _curation_ray import STAGE_UNITS, compare_ray, run_ray_stages, stage_count

REPO = Path(__file__).resolve().parents[1]
EXTERNAL_INPUTS = ("raw_pool", "trusted_pairs", "probe_test", "sample_truth")
# Nodes that train a network for a fixed number of steps on at most a fixed number of images
# (the filtering network, the copy descriptor): a one-off cost per run that does not grow with
# the pool, so the per-image figures leave it out and print it apart.
TRAINING_STAGES = ("train_filter_network", "train_copy_detector")


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
    parser.add_argument("--floor-size", type=int, default=224,
                        help="side of the decode floor's one bicubic resize (default 224, CLIP's "
                             "input)")
    parser.add_argument("--fast", action="store_true",
                        help="curation.index.fast_crop_hashes: true and "
                             "curation.scoring.decode_min_side: the filtering network's input "
                             "size (the opt-in speed settings)")
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


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run every node of the curation pipeline; return per-node seconds, sizes and peak RSS."""
    warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
    logging.basicConfig(level=logging.INFO if spec["verbose"] else logging.WARNING)
    from kedro.config import OmegaConfigLoader
    from kedro.io import DataCatalog

    from aim_kedro.io.shards import image_bytes
    from aim_kedro.pipelines.curation import create_pipeline

    rss_imports = peak_rss_mib()
    conf = OmegaConfigLoader(str(REPO / "conf"), base_env="base", default_run_env="base")
    params = dict(conf["parameters"])
    params["curation"] = {**params["curation"], "progress": False}
    # Every stage in this process, so that ForwardCpu sees every forward pass (the local
    # executor's worker processes would hide theirs, and add their start-up to the pool's cost).
    params["curation"]["executor"] = {**params["curation"]["executor"], "workers": 1}
    overrides = {key: spec[f"filter_{key}"] for key in ("epochs", "steps")
                 if spec[f"filter_{key}"] is not None}
    params["curation"]["filter_network"] = {**params["curation"]["filter_network"], **overrides}
    if spec["fast"]:
        curation = params["curation"]
        curation["index"] = {**curation["index"], "fast_crop_hashes": True}
        curation["scoring"] = {**curation["scoring"],
                               "decode_min_side": curation["filter_network"]["image_size"]}
    pipeline = create_pipeline()

    def make_catalog(out: Path) -> DataCatalog:
        entries: dict[str, dict[str, Any]] = {}
        for name in sorted(n for n in pipeline.datasets() if not n.startswith("params:")):
            entry = dict(conf["catalog"][name])
            if name in EXTERNAL_INPUTS:
                entry.update(filepath=spec["inputs"][name], versioned=False)
            elif "filepath" in entry:  # eval_leak_sets names its sets in the entry itself
                entry["filepath"] = str(out / entry["filepath"])
            entries[name] = entry
        return DataCatalog.from_config(entries)

    catalog = make_catalog(Path(spec["out_dir"]))
    stages = []
    forward = ForwardCpu().__enter__()
    for node in pipeline.nodes:
        per_stage = reset_peak_rss()
        cpu_start, forward_start = cpu_seconds(), forward.seconds
        start = time.perf_counter()
        inputs = {
            name: param_value(params, name) if name.startswith("params:") else catalog.load(name)
            for name in node.inputs
        }
        loaded = time.perf_counter()
        outputs = node.run(inputs)
        ran = time.perf_counter()
        for name in node.outputs:
            catalog.save(name, outputs[name])
        saved = time.perf_counter()
        cpu, inference = cpu_seconds() - cpu_start, forward.seconds - forward_start
        stats = {
            name: value for name, value in outputs.items()
            if name.endswith("_stats") and isinstance(value, dict)
        }
        sizes = {name: n for name, value in outputs.items() if (n := table_height(value)) is not None}
        del inputs, outputs
        gc.collect()
        stages.append({
            "node": node.name, "load": loaded - start, "run": ran - loaded, "save": saved - ran,
            "cpu": cpu, "inference_cpu": inference,
            "sizes": sizes, "stats": json.loads(json.dumps(stats, default=str)),
            "stage_peak_rss_mib": current_peak_rss_mib() if per_stage else peak_rss_mib(),
        })
    forward.__exit__()
    # Resetting the mark also resets ru_maxrss, so the run's peak is the largest stage peak.
    overall = max([rss_imports] + [s["stage_peak_rss_mib"] or 0.0 for s in stages])
    pool = [found[1] for sample in catalog.load("raw_pool") if (found := image_bytes(sample))]
    floor = decode_floor(pool, spec["floor_size"])
    on_ray = None
    if spec["ray"]:
        on_ray = run_ray_stages(spec, pipeline, params, catalog,
                                make_catalog(Path(spec["out_dir"]) / "ray"))
    return {"rss_after_imports_mib": rss_imports, "stages": stages, "peak_rss_mib": overall,
            "per_stage_peaks": per_stage, "ray": on_ray, "floor_ips": floor}


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
        "floor_size": args.floor_size,
        "fast": args.fast,
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
    tail = "" if args.verbose else log_path.read_text()[-4000:]
    result = worker_result(done.stdout, done.returncode, f"curation worker for pool {n}", tail)
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(Path(args.worker).read_text()))
        print_result(result)
        return 0

    print(environment_line())
    with tempfile.TemporaryDirectory(prefix="bench_curation_") as tmp_name:
        tmp = Path(tmp_name)
        inputs = write_inputs(args, tmp)
        print(f"# pools {', '.join(map(str, args.sizes))} images at {args.image_size} px, "
              f"{'--fast: fast crop hashes, scoring decoded at the scorer input size, ' if args.fast else ''}"
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
    no_train: dict[str, Any] = {"stage": "end to end w/o training", "counts": "pool samples"}
    for n in args.sizes:
        stages = results[n]["stages"]
        total = sum(s["load"] + s["run"] + s["save"] for s in stages)
        train = sum(s["load"] + s["run"] + s["save"] for s in stages
                    if s["node"] in TRAINING_STAGES)
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
                   if s["node"] not in TRAINING_STAGES)

    rss_small, rss_big = results[small]["peak_rss_mib"], results[big]["peak_rss_mib"]
    pool_small, pool_big = pool_peak(small), pool_peak(big)
    print("\n# peak RSS after imports: " + ", ".join(
        f"{results[n]['rss_after_imports_mib']:.0f} MiB @{n}" for n in args.sizes)
        + " | peak RSS of the run: " + ", ".join(
        f"{results[n]['peak_rss_mib']:.0f} MiB @{n}" for n in args.sizes)
        + ("" if results[big]["per_stage_peaks"] else " (per-stage peaks unavailable: the "
           "column shows the running peak)"))
    print(
        f"# curation end to end {totals[f'ips{small}']:.1f} / {totals[f'ips{big}']:.1f} img/s at "
        f"{small} / {big} images ({args.image_size} px; w/o training "
        f"{no_train[f'ips{small}']:.1f} / {no_train[f'ips{big}']:.1f}) | peak RSS "
        f"{rss_small:.0f} -> {rss_big:.0f} MiB ({(rss_big - rss_small) / rss_small:+.1%}), "
        f"pool stages {pool_small:.0f} -> {pool_big:.0f} MiB "
        f"({(pool_big - pool_small) / pool_small:+.1%}) for {big / small:.1f}x the pool"
        + (f" | {engine}" if engine else "")
    )
    own, floor = own_cpu(args, results[big]), results[big]["floor_ips"]
    summary(f"curation cpu {own:.1f} img/s/core excluding inference; floor {floor:.1f} "
            f"img/s/core; ratio {own / floor:.2f}")
    return 0


def own_cpu(args: argparse.Namespace, result: dict[str, Any]) -> float:
    """Print the pipeline's own CPU per stage (the process's CPU minus what model forward passes
    took) at the largest pool; return pool images per own CPU-second of the stages that see
    the pool (all but ``TRAINING_STAGES``)."""
    big = args.sizes[-1]
    rows = []
    for stage in result["stages"]:
        if stage["node"] in TRAINING_STAGES:
            print(f"# {stage['node']}: {stage['cpu']:.1f} CPU s, {stage['inference_cpu']:.1f} of "
                  "them in forward passes (a fixed cost per run, left out of the per-image rows)")
            continue
        mine = stage["cpu"] - stage["inference_cpu"]
        rows.append({"stage": stage["node"], "cpu": stage["cpu"], "inference": stage["inference_cpu"],
                     "own": mine, "ms": mine / big * 1e3})
    total = sum(r["own"] for r in rows)
    rows.append({"stage": "pool stages", "cpu": sum(r["cpu"] for r in rows),
                 "inference": sum(r["inference"] for r in rows), "own": total,
                 "ms": total / big * 1e3})
    print(f"\n## own CPU at {big} images ({args.image_size} px): user + system s, minus the "
          f"forward passes of torch modules, dlib's CNN and onnxruntime; floor: Pillow decode + "
          f"one bicubic resize to {args.floor_size} px of the same JPEGs, {result['floor_ips']:.1f} img/s/core")
    print_table(rows, [("stage", "stage", ""), ("cpu", "CPU s", ".2f"),
                       ("inference", "inference CPU s", ".2f"), ("own", "own CPU s", ".2f"),
                       ("ms", "own CPU ms / pool image", ".2f")])
    return big / total if total > 0 else float("inf")


if __name__ == "__main__":
    sys.exit(main())
