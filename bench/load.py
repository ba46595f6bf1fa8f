"""Load: a large pool of tiny synthetic samples through index, filters, dedup and manifest, with
the per-sample CPU cost and the peak memory of each stage at two pool sizes.

The parent writes each pool (``--sizes``, default 50k and 200k; quick 2k and 8k) as webdataset
shards of smooth 32 px JPEGs with captions and uids (5% byte copies and 5% re-encoded copies so
dedup has pairs to find), then runs every size in a FRESH subprocess: the nodes
``build_pool_index``, ``apply_filters``, ``deduplicate`` and ``build_pool_manifest`` of
``aim_kedro.pipelines.curation`` with the project's ``params:curation`` (only
``filters.min_shorter_side`` lowered to the tiny images' size, the progress bars off). Scoring
is replaced by synthetic scores (a hash of the uid), so the figures are the pipeline's own
work without any model. Peak RSS per stage is ``VmHWM`` after resetting the mark (Linux),
CPU the process's user + system time; "tables" is the in-memory size of the stage's outputs
(the compact per-sample arrays, which do grow with the pool).

    .venv/bin/python bench/load.py --quick            # 2000 and 8000 samples
    .venv/bin/python bench/load.py                    # 50000 and 200000 samples
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (
    cpu_seconds,
    current_peak_rss_mib,
    environment_line,
    load_average,
    param_value,
    peak_rss_mib,
    print_result,
    print_table,
    reset_peak_rss,
    summary,
    worker_result,
)

REPO = Path(__file__).resolve().parents[1]
STAGES = ("build_pool_index", "apply_filters", "deduplicate", "build_pool_manifest")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None,
                        help="comma-separated pool sizes (default 50000,200000; quick 2000,8000)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the JPEGs in px")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="shard size (default 10000, quick 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="pools of 2000 and 8000 samples")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default = "2000,8000" if args.quick else "50000,200000"
    args.sizes = sorted(int(s) for s in (args.sizes or default).split(","))
    args.samples_per_shard = args.samples_per_shard or (1000 if args.quick else 10_000)
    return args


def tiny_pool(n: int, size: int, seed: int) -> Iterator[dict[str, Any]]:
    """``n`` samples: smooth random pictures (4x4 noise scaled up) as JPEG, a caption, a uid;
    5% byte copies and 5% re-encoded copies of a recent sample."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    recent: list[bytes] = []
    for i in range(n):
        draw = rng.random()
        if recent and draw < 0.1:
            data = recent[int(rng.integers(len(recent)))]
            if draw < 0.05:
                buffer = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=70)
                data = buffer.getvalue()
        else:
            small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            small.resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
            data = buffer.getvalue()
            recent = (recent + [data])[-256:]
        uid = hashlib.blake2b(f"load/{seed}/{i}".encode(), digest_size=16).hexdigest()
        yield {"__key__": f"{i:09d}", "jpg": data, "txt": f"a small picture number {i}",
               "json": {"uid": uid}}


def synthetic_scores(index: Any) -> tuple[Any, Any]:
    """clip_scores and clip_embeddings (as ``score_tables`` makes them) for the samples the
    index accepted: a score from a hash of the uid, tiny embeddings."""
    import numpy as np
    import polars as pl

    uids = index.filter(pl.col("reject_reason").is_null())["uid"]
    codes = np.array([int(u[:8], 16) for u in uids.to_list()], dtype=np.float64)
    scores = pl.DataFrame({
        "uid": uids,
        "clip_score": pl.Series((codes % 1000) / 1000.0, dtype=pl.Float32),
        "nsfw_score": pl.Series(np.zeros(len(uids)), dtype=pl.Float32),
    })
    emb = np.ones((len(uids), 4), dtype=np.float16)
    embeddings = pl.DataFrame({"uid": uids, "image_emb": pl.Series(emb), "text_emb": pl.Series(emb)})
    return scores, embeddings


def _table_mib(value: Any) -> float:
    size = getattr(value, "estimated_size", None)
    return size("mb") if callable(size) else 0.0


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the four nodes on the pool of ``spec``; per-stage CPU, wall, peak RSS, table sizes."""
    warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
    import polars as pl
    from kedro.config import OmegaConfigLoader

    from aim_kedro.io.shards import ShardSet
    from aim_kedro.pipelines.curation import create_pipeline

    conf = OmegaConfigLoader(str(REPO / "conf"), base_env="base", default_run_env="base")
    params = dict(conf["parameters"])
    curation = {**params["curation"], "progress": False}
    curation["filters"] = {**curation["filters"], "min_shorter_side": spec["min_side"]}
    # No model runs here: the copy-detection pass needs its descriptor network (bench/dedup.py
    # measures it), so only the hash dedup and the exact eval-leak checks run.
    curation["dedup"] = {**curation["dedup"], "copy_detection": False, "eval_copy_detection": False}
    # One process, so its CPU time and peak RSS are the whole cost of each stage.
    curation["executor"] = {**curation["executor"], "workers": 1}
    params["curation"] = curation
    data: dict[str, Any] = {"raw_pool": ShardSet.open(spec["pool"]),
                            "probe_test": ShardSet.open(spec["probe"]), "filter_network": {},
                            "eval_leak_sets": {}, "copy_detector": None,
                            "copy_descriptors": pl.DataFrame({"uid": [], "descriptor": []})}
    rss_imports = peak_rss_mib()
    stages = []
    for node in create_pipeline().only_nodes(*STAGES).nodes:
        if node.name == "apply_filters":
            data["clip_scores"], data["clip_embeddings"] = synthetic_scores(data["pool_index"])
            data["nsfw_scores"] = data["clip_scores"].select(
                "uid", pl.col("nsfw_score").alias("nsfw_classifier_score"),
                pl.lit(None, dtype=pl.String).alias("nsfw_classifier_label"))
        per_stage = reset_peak_rss()
        cpu_start, start = cpu_seconds(), time.perf_counter()
        outputs = node.run({name: param_value(params, name) if name.startswith("params:")
                            else data[name] for name in node.inputs})
        cpu, wall = cpu_seconds() - cpu_start, time.perf_counter() - start
        data.update(outputs)
        stages.append({
            "node": node.name, "cpu": cpu, "wall": wall,
            "peak_rss_mib": current_peak_rss_mib() if per_stage else peak_rss_mib(),
            "tables_mib": sum(_table_mib(v) for v in outputs.values()),
            "live_mib": sum(_table_mib(v) for v in data.values()),
        })
        gc.collect()
    manifest = data["pool_manifest"]
    reasons = dict(manifest.group_by("reject_reason").len().drop_nulls().iter_rows())
    return {"stages": stages, "rss_after_imports_mib": rss_imports,
            "kept": int(manifest["kept"].sum()), "rejected": reasons}


def write_pool(args: argparse.Namespace, n: int, tmp: Path) -> str:
    from aim_kedro.io.shards import write_shards

    path = tmp / f"pool_{n}"
    write_shards(tiny_pool(n, args.image_size, args.seed), str(path),
                 samples_per_shard=args.samples_per_shard, prefix="pool")
    return str(path)


def run_size(args: argparse.Namespace, n: int, tmp: Path, probe: str) -> dict[str, Any]:
    """Write the pool of ``n`` samples, run the worker on it in a fresh interpreter."""
    start = time.perf_counter()
    spec = {"pool": write_pool(args, n, tmp), "probe": probe, "min_side": args.image_size // 2}
    written = time.perf_counter() - start
    spec_path = tmp / f"spec_{n}.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           str(spec_path)], capture_output=True, text=True, check=False,
                          cwd=str(REPO))
    result = worker_result(done.stdout, done.returncode, f"load worker for {n} samples",
                           done.stderr[-4000:])
    result["written_s"] = written
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(Path(args.worker).read_text()))
        print_result(result)
        return 0
    print(environment_line())
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp_name:
        tmp = Path(tmp_name)
        from aim_kedro.io.shards import write_shards

        write_shards(tiny_pool(50, args.image_size, args.seed + 1), str(tmp / "probe"),
                     samples_per_shard=1000, prefix="probe")
        for n in args.sizes:
            results[n] = run_size(args, n, tmp, str(tmp / "probe"))
            print(f"# {n} samples: pool written in {results[n]['written_s']:.1f} s, kept "
                  f"{results[n]['kept']}, rejected {results[n]['rejected']} (load average "
                  f"{load_average()})", flush=True)
    rows = []
    for i, stage in enumerate(STAGES):
        row: dict[str, Any] = {"stage": stage}
        for n in args.sizes:
            s = results[n]["stages"][i]
            row.update({f"us{n}": s["cpu"] / n * 1e6, f"s{n}": s["wall"],
                        f"rss{n}": s["peak_rss_mib"], f"tab{n}": s["tables_mib"],
                        f"live{n}": s["live_mib"]})
        rows.append(row)
    total: dict[str, Any] = {"stage": "the four stages"}
    for n in args.sizes:
        stages = results[n]["stages"]
        total.update({f"us{n}": sum(s["cpu"] for s in stages) / n * 1e6,
                      f"s{n}": sum(s["wall"] for s in stages),
                      f"rss{n}": max(s["peak_rss_mib"] for s in stages),
                      f"tab{n}": sum(s["tables_mib"] for s in stages),
                      f"live{n}": max(s["live_mib"] for s in stages),
                      f"beyond{n}": max(s["peak_rss_mib"] - s["live_mib"] for s in stages)})
    rows.append(total)
    columns = [("stage", "stage", "")]
    for n in args.sizes:
        columns += [(f"us{n}", f"CPU us/sample @{n}", ".0f"), (f"s{n}", f"wall s @{n}", ".1f"),
                    (f"rss{n}", f"peak RSS MiB @{n}", ".0f"), (f"tab{n}", f"tables MiB @{n}", ".1f"),
                    (f"live{n}", f"live MiB @{n}", ".1f")]
    print(f"\n## index, filters, dedup, manifest on {args.image_size} px JPEGs ({args.samples_per_shard}"
          " per shard; peak RSS per stage; tables: the stage's outputs in memory; live: every "
          "table held after the stage, its inputs included)")
    print_table(rows, columns)
    small, big = args.sizes[0], args.sizes[-1]
    rss_s, rss_b = total[f"rss{small}"], total[f"rss{big}"]
    tab_s, tab_b = total[f"tab{small}"], total[f"tab{big}"]
    beyond_s, beyond_b = total[f"beyond{small}"], total[f"beyond{big}"]
    summary(
        f"load {small} / {big} samples: {total[f'us{small}']:.0f} / {total[f'us{big}']:.0f} us "
        f"CPU per sample (index, filters, dedup, manifest); peak RSS {rss_s:.0f} -> {rss_b:.0f} "
        f"MiB ({(rss_b - rss_s) / rss_s:+.1%}) for {big / small:.0f}x the pool, of which tables "
        f"{tab_s:.0f} -> {tab_b:.0f} MiB; beyond the live tables {beyond_s:.0f} -> "
        f"{beyond_b:.0f} MiB ({(beyond_b - beyond_s) / beyond_s:+.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
