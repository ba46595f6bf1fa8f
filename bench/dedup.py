"""Copy detection on a pool the sample never shows: recall per transform family, false positives,
CPU seconds per 10k images, and a scale run of the candidate stage.

The pool (``_dedup_pool``): distinct images from offline sources the sample does not use
(photo tiles, matplotlib charts, procedural scenes), copies of them made by AugLy for every
DISC21 / AugLy transform family, hard negatives (two crops of one picture overlapping < 25%,
two renders of different digits of one class) and copies of the images of a separate
evaluation set, all JPEG-encoded and written as webdataset shards; the evaluation set is written
as an ImageFolder tree. The project's real code then runs on it, stage by stage: the index
(``build_index``), the copy detector's training (``train_copy_detector`` on the pool's own
images), the descriptor pass (``describe_index``; the evaluation images through ``eval_index``)
and ``deduplicate`` (exact and pHash first pass, descriptor candidates, verification on images
decoded from the shards, clusters), with every evaluation image a leak target.

Parameters: ``conf/base``'s ``curation.dedup`` with the real-pool values of its comments
(``REAL_POOL``; ``--params base`` keeps the sample's). Figures: recall per family (a copy is
found when it lands in its source's cluster; a leak when it is rejected naming its evaluation
image), false positives on distinct images (an original whose cluster holds another picture;
clusters joined only through two screenshots of one AugLy template are counted apart), on hard
negative pairs (both in one cluster) and false leaks; CPU seconds (user + system of this
process, faiss threads included) per stage and per 10k images for dedup excluding descriptor
inference. Scale: ``knn_pairs`` on ``--scale`` synthetic descriptors (1% planted near copies)
with the ANN index, its time, peak memory (Linux VmHWM) and the planted pairs it finds.

    .venv/bin/python bench/dedup.py --quick                # ~150 distinct, 5 copies per family
    .venv/bin/python bench/dedup.py                        # 800 distinct, 24 per family, 1M scale
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml
from _common import (
    current_peak_rss_mib,
    environment_line,
    print_table,
    reset_peak_rss,
    summary,
)
from _dedup_pool import FAMILIES, BenchPool, build_bench_pool, encode_jpeg

REPO = Path(__file__).resolve().parents[1]

REAL_POOL: dict[str, Any] = {
    "copy_detection": True,
    "eval_copy_detection": True,
    "verify": {"min_coverage": 0.0, "min_correlation": 0.5},
    "candidates": {"k": 10, "background_rank": 10, "min_similarity": 0.5, "margin": 0.0},
}
"""The real-pool values that conf/base/parameters_curation.yml gives in its comments, where
they differ from the sample's (copy-detection knobs only; descriptor size as in conf/base)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small pool and a 100k scale run")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--distinct", type=int, default=None, help="distinct images (800)")
    parser.add_argument("--copies", type=int, default=None, help="copies per family (24)")
    parser.add_argument("--hard-pairs", type=int, default=None, help="pairs of each kind (60)")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluation set (150)")
    parser.add_argument("--leaks", type=int, default=None, help="leaks in the pool (60)")
    parser.add_argument("--steps", type=int, default=None,
                        help="copy-detector training steps (conf/base's)")
    parser.add_argument("--scale", type=int, default=None, help="synthetic descriptors (1M)")
    parser.add_argument("--params", choices=("real", "base"), default="real")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = {"distinct": 150, "copies": 5, "hard_pairs": 10, "eval_images": 30, "leaks": 15,
             "scale": 100_000}
    full = {"distinct": 800, "copies": 24, "hard_pairs": 60, "eval_images": 150, "leaks": 60,
            "scale": 1_000_000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def dedup_params(which: str, steps: int | None, threads: int | None) -> dict[str, Any]:
    """conf/base's ``curation.dedup`` with ``REAL_POOL`` (for ``real``) and the CLI's steps."""
    base = yaml.safe_load((REPO / "conf/base/parameters_curation.yml").read_text())["curation"]
    params = copy.deepcopy(base["dedup"])
    if which == "real":
        for key, value in REAL_POOL.items():
            if isinstance(value, dict):
                params[key].update(value)
            else:
                params[key] = value
    if steps is not None:
        params["descriptor"]["steps"] = steps
    if threads is not None:
        params["descriptor"]["num_threads"] = threads
    return params


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_inputs(bench: BenchPool, root: Path) -> tuple[Any, Any, dict[str, str]]:
    """The pool as shards (uid = the bench uid) and the evaluation set as an ImageFolder tree;
    returns the ShardSet, the labelled set and eval_id -> bench uid."""
    from aim_kedro.aim.evalsets import from_image_folder
    from aim_kedro.io.shards import ShardSet, write_shards

    samples = [{"__key__": f"{i:09d}", "jpg": encode_jpeg(item.image), "txt": "a picture",
                "json": {"uid": item.uid}} for i, item in enumerate(bench.pool)]
    write_shards(samples, str(root / "pool"), samples_per_shard=500)
    folder = root / "evalset" / "all"
    folder.mkdir(parents=True)
    eval_ids = {}
    for i, item in enumerate(bench.eval_set):
        name = f"{i:05d}.jpg"
        (folder / name).write_bytes(encode_jpeg(item.image))
        eval_ids[f"evalset/all/{name}"] = item.uid
    return (ShardSet.open(str(root / "pool")), from_image_folder(str(root / "evalset"), "evalset"),
            eval_ids)


def metrics(bench: BenchPool, decisions: pl.DataFrame, eval_ids: dict[str, str]) -> dict[str, Any]:
    """Recall per family, leak recall, and the false positives (see the module docstring)."""
    info = {item.uid: item for item in bench.pool}
    rows = {uid: (cluster, reason, eval_id) for uid, cluster, reason, eval_id in
            decisions.select("uid", "dedup_cluster", "reject_reason", "eval_id").iter_rows()}
    kinds = dict(decisions.select("uid", "match_kind").iter_rows())
    recall: dict[str, list[bool]] = {}
    leaks: dict[str, list[bool]] = {}
    members: dict[int, list[str]] = {}
    for uid, (cluster, _, _) in rows.items():
        if cluster is not None:
            members.setdefault(cluster, []).append(uid)
    for uid, item in info.items():
        cluster, reason, eval_id = rows[uid]
        if item.role == "copy":
            recall.setdefault(item.family, []).append(
                cluster is not None and cluster == rows[item.source][0])
        elif item.role == "leak":
            leaks.setdefault(item.family, []).append(
                reason == "eval_leak" and eval_ids.get(eval_id or "") == item.source)

    def group(uid: str) -> str:
        item = info[uid]
        return item.source if item.role in ("copy", "leak") else uid

    distinct = [u for u, item in info.items() if item.role == "distinct"]
    false_distinct = template = 0
    false_by: dict[str, int] = {}
    for uid in distinct:
        cluster = rows[uid][0]
        if cluster is None:
            continue
        groups = {group(u) for u in members[cluster]}
        if len(groups) > 1:
            shots = {info[u].source for u in members[cluster]
                     if info[u].family == "screenshot"}
            if len(shots) > 1:
                template += 1
            else:
                false_distinct += 1
                why = f"{uid.split('-')[0]} joined by {kinds.get(uid)}"
                false_by[why] = false_by.get(why, 0) + 1
    pairs: dict[str, dict[str, list[str]]] = {}
    for uid, item in info.items():
        if item.role == "hard_negative":
            pairs.setdefault(item.family, {}).setdefault(item.source, []).append(uid)
    hard = {kind: [rows[a][0] is not None and rows[a][0] == rows[b][0] for a, b in found.values()]
            for kind, found in pairs.items()}
    not_leaks = [u for u, item in info.items() if item.role != "leak"]
    false_leaks = sum(rows[u][1] == "eval_leak" for u in not_leaks)
    return {"recall": recall, "leaks": leaks, "distinct": len(distinct),
            "false_distinct": false_distinct, "false_by": dict(sorted(false_by.items())),
            "template_joined": template, "hard": hard,
            "false_leaks": false_leaks, "not_leaks": len(not_leaks)}


def scale_run(n: int, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """``knn_pairs`` over ``n`` synthetic unit descriptors (dim of conf/base's descriptor), 1%
    of them noisy copies of others, with the ANN index (``exact_below`` set under ``n``)."""
    from aim_kedro.common.config import from_mapping
    from aim_kedro.curation.matching import CandidateConfig, knn_pairs

    dim = int(params["descriptor"]["dim"])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = rng.choice(n, n // 100, replace=False)
    sources = rng.integers(0, n, len(copies))
    keep = copies != sources
    copies, sources = copies[keep], sources[keep]
    x[copies] = x[sources] + rng.standard_normal((len(copies), dim), dtype=np.float32) * 0.02
    x = x.astype(np.float16)
    cfg = from_mapping(CandidateConfig, {**params["candidates"], "exact_below": min(
        int(params["candidates"]["exact_below"]), n - 1)}, "curation.dedup.candidates")
    reset_peak_rss()
    before = current_peak_rss_mib()
    cpu, wall = cpu_seconds(), time.perf_counter()
    i, j, _ = knn_pairs(x, cfg)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    planted = sum((min(a, b), max(a, b)) in found for a, b in zip(copies, sources, strict=True))
    return {"n": n, "dim": dim, "ann": cfg.ann, "seconds": wall, "cpu_seconds": cpu,
            "peak_mib": current_peak_rss_mib(), "start_mib": before, "pairs": len(i),
            "planted_recall": planted / max(1, len(copies))}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    import torch

    from aim_kedro.curation.config import block
    from aim_kedro.curation.copydetect import load_describer, train_copy_detector
    from aim_kedro.curation.dedup import DedupConfig, dedup_pool, deduplicate
    from aim_kedro.curation.describe import (
        aligned_descriptors,
        describable,
        describe_index,
        pool_loader,
        training_images,
    )
    from aim_kedro.curation.eval_leaks import eval_index, eval_loader
    from aim_kedro.curation.executors import LocalExecutor
    from aim_kedro.curation.index import IndexConfig, build_index

    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_line())
    params = dedup_params(args.params, args.steps, args.threads)
    cfg = block(DedupConfig, params)
    index_cfg = IndexConfig()
    start = time.perf_counter()
    bench = build_bench_pool(args.image_size, args.copies, args.distinct, args.hard_pairs,
                             args.eval_images, args.leaks, args.seed)
    n = len(bench.pool)
    print(f"# pool {n} images at {args.image_size} px ({args.distinct} distinct, "
          f"{args.copies} copies x {len(FAMILIES)} families, {2 * args.hard_pairs} hard-negative "
          f"pairs, {args.leaks} leaks of {args.eval_images} evaluation images), built in "
          f"{time.perf_counter() - start:.0f} s; params {args.params}, descriptor "
          f"{cfg.descriptor.steps} steps at {cfg.descriptor.image_size} px")
    cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards, evalset, eval_ids = write_inputs(bench, Path(tmp))
        local = LocalExecutor(progress=False)
        mark = cpu_seconds()
        pool_index, _ = build_index(shards, index_cfg, local, progress=False)
        cpu["index (decode, hashes)"] = cpu_seconds() - mark
        mark = cpu_seconds()
        checkpoint = train_copy_detector(
            training_images(shards, pool_index, cfg.descriptor, index_cfg), cfg.descriptor,
            progress=False)
        cpu["copy detector training"] = cpu_seconds() - mark
        mark = cpu_seconds()
        describer = load_describer(cfg.descriptor, checkpoint)
        table, _ = describe_index(lambda: describer, shards, describable(pool_index), index_cfg,
                                  describer.image_size, cfg.descriptor.batch_size_inference,
                                  local, progress=False)
        sets = {"evalset": evalset}
        evals = eval_index(sets, index_cfg, None, describer)
        cpu["descriptor inference (pool + eval)"] = cpu_seconds() - mark
        scores = pool_index.select("uid").with_columns(clip_score=pl.lit(0.5))
        decisions_in = pool_index.select("uid").with_columns(
            reject_reason=pl.lit(None, pl.String), reject_detail=pl.lit(None, pl.String))
        pool = dedup_pool(pool_index, scores, decisions_in)
        mark = cpu_seconds()
        decisions, stats = deduplicate(
            pool, None, evals.table, None, cfg,
            descriptors=aligned_descriptors(pool["uid"], table),
            eval_descriptors=evals.descriptors, images=pool_loader(shards, pool, index_cfg),
            eval_images=eval_loader(sets, index_cfg))
        cpu["dedup (candidates, verification, clusters)"] = cpu_seconds() - mark
    figures = metrics(bench, decisions, eval_ids)

    rows = []
    for family in FAMILIES:
        found = figures["recall"].get(family, [])
        leak = figures["leaks"].get(family, [])
        rows.append({"family": family, "copies": len(found),
                     "recall_pct": 100 * float(np.mean(found)) if found else None,
                     "leaks": len(leak), "leak_recall_pct": 100 * float(np.mean(leak)) if leak else None})
    print()
    print_table(rows, [("family", "family", ""), ("copies", "copies", "d"),
                       ("recall_pct", "recall %", ".1f"), ("leaks", "leaks", "d"),
                       ("leak_recall_pct", "leak recall %", ".1f")])
    all_leaks = [x for v in figures["leaks"].values() for x in v]
    targeted = {f: float(np.mean(v)) for f, v in figures["recall"].items() if f != "hflip" and v}
    worst = min(targeted, key=targeted.get)
    hard = {k: (sum(v), len(v)) for k, v in figures["hard"].items()}
    fp_distinct = figures["false_distinct"] / max(1, figures["distinct"])
    hard_all = sum(a for a, _ in hard.values()) / max(1, sum(b for _, b in hard.values()))
    print()
    fp_rows = [
        {"what": "distinct images in a cluster with another picture", "count": figures["false_distinct"],
         "of": figures["distinct"], "pct": 100 * fp_distinct},
        {"what": "distinct images joined via two screenshots of one template",
         "count": figures["template_joined"], "of": figures["distinct"],
         "pct": 100 * figures["template_joined"] / max(1, figures["distinct"])},
        *({"what": f"hard negatives: {k}", "count": a, "of": b, "pct": 100 * a / max(1, b)}
          for k, (a, b) in hard.items()),
        {"what": "false eval leaks", "count": figures["false_leaks"], "of": figures["not_leaks"],
         "pct": 100 * figures["false_leaks"] / max(1, figures["not_leaks"])},
    ]
    print_table(fp_rows, [("what", "false positives", ""), ("count", "count", "d"),
                          ("of", "of", "d"), ("pct", "%", ".2f")])
    print(f"# false positives on distinct images (source kind, match kind): {figures['false_by']}")
    print()
    per10k = 1e4 / n
    print_table([{"stage": k, "cpu_s": v, "per10k": v * per10k} for k, v in cpu.items()],
                [("stage", "stage", ""), ("cpu_s", "CPU-s", ".1f"), ("per10k", "CPU-s / 10k images", ".1f")])
    copy_stats = stats.get("copy_detection", {})
    print(f"# verification: pool {copy_stats.get('pool', {}).get('pairs_verified')} pairs "
          f"({copy_stats.get('pool', {}).get('candidate_pairs')} descriptor candidates), eval "
          f"{copy_stats.get('eval', {}).get('pairs_verified')} pairs")
    scale = scale_run(args.scale, params, args.seed)
    print()
    print_table([scale], [("n", "descriptors", "d"), ("dim", "dim", "d"), ("ann", "index", ""),
                          ("seconds", "seconds", ".1f"), ("cpu_seconds", "CPU-s", ".1f"),
                          ("peak_mib", "peak MiB", ".0f"), ("pairs", "candidate pairs", "d"),
                          ("planted_recall", "planted found", ".3f")])
    dedup_cpu = cpu["dedup (candidates, verification, clusters)"] * per10k
    flips = float(np.mean(figures["recall"].get("hflip", [0])))
    summary(
        f"dedup bench: worst family {worst} {100 * targeted[worst]:.1f}% recall (flips "
        f"{100 * flips:.0f}%), leaks {100 * float(np.mean(all_leaks)) if all_leaks else 0:.1f}%, "
        f"FP {100 * fp_distinct:.2f}% of distinct / {100 * hard_all:.1f}% of hard negatives, "
        f"dedup {dedup_cpu:.0f} CPU-s per 10k images at {args.image_size} px, candidates on "
        f"{scale['n']:,} descriptors {scale['seconds']:.0f} s / {scale['peak_mib'] / 1024:.2f} GiB peak"
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
