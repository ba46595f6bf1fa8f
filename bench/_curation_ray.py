"""The Ray half of ``bench/curation.py``: the per-shard nodes again on a local Ray, and the
table that compares them with the local run (see that script's docstring)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from _common import cpu_seconds, param_value, print_table, table_height

RAY_STAGES = ("build_pool_index", "score_pool", "detect_faces", "write_dfn_subset")

# What a stage's images/s counts: the pool by default, else (what, how to get the count).
STAGE_UNITS = {
    "train_filter_network": "trusted pairs",
    "score_pool": "scored samples",
    "detect_faces": "kept samples",
    "write_dfn_subset": "kept samples",
    "check_dfn_subset": "written samples",
}


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
            name: param_value(ray_params, name) if name.startswith("params:") else catalog.load(name)
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
                      if (n := table_height(value)) is not None},
            "stats": json.loads(json.dumps(stats, default=str)),
            "identical": all(v for v in checks.values() if v is not None),
        })
    ray.shutdown()
    return {"ray_start_s": ray_start, "cpus": spec["ray_cpus"] or os.cpu_count(),
            "stages": stages}


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
