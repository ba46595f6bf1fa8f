"""Pre-training input pipeline: decode + augmentation images/s, and whether it keeps up with training.

1. Stages, one process: shard read (``curation.shards.read_shard``), decode
   (``io.decode.decode_image``) and AIM's augmentation (``aim.data.train_transform``:
   RandomResizedCrop 0.4-1 bicubic, flip, normalise) over the same images.
2. The training loader (``aim.data.ResumableLoader``, as ``aim.train`` builds it: shuffled,
   per-sample seeded augmentation, batches) for each DataLoader worker count: start-up time
   (workers spawned, shuffle buffer filled, first batch out) and steady images/s.
3. The AIM training step of the preset (``train_step.training_step``: forward, loss, backward,
   clip, AdamW) on a fixed in-memory batch and fed by the loader, interleaved step by step
   (median of each). The loader keeps up when the fed step runs at >= 95% of the in-memory
   step's images/s: on a machine with few cores the workers and the step compete for the same
   cores, which the loader-alone figure does not show.

The pool is synthetic (the sample pipeline's renderers: digits, photo crops, faces; JPEG), or any
shard folder given with ``--shards``.

    .venv/bin/python bench/loader.py --quick
    .venv/bin/python bench/loader.py --workers 0,1,2,4 --pool-size 8192 --source-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import environment_line, print_table, stats, summary, synthetic_pool, time_call
from train_step import adamw, training_step

from aim_kedro.aim.data import ResumableLoader, ShardSource, train_transform
from aim_kedro.aim.distributed import LossModule
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import PRESETS, get_config
from aim_kedro.io.decode import decode_image
from aim_kedro.io.shards import image_bytes, list_shards, read_shard, write_shards

KEEPS_UP = 0.95


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="aim_sample", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=None, help="default 64, quick 32")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--shards", default=None,
                        help="an existing shard folder to read (default: a synthetic pool)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="synthetic pool size (default 4096, quick 512)")
    parser.add_argument("--source-size", type=int, default=64,
                        help="side of the synthetic JPEGs in px (the sample pool's is 64)")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help="loader shuffle buffer (default: the training default 1000, "
                             "quick 256)")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per worker count, after the first (default 40, "
                             "quick 8)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps fed by the loader (default 20, quick 4)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="where the training step runs (bf16 autocast on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small pool, few batches (< 1 min)")
    args = parser.parse_args(argv)
    args.pool_size = args.pool_size or (512 if args.quick else 4096)
    args.shuffle_buffer = (args.shuffle_buffer if args.shuffle_buffer is not None
                           else (256 if args.quick else 1000))
    args.batch_size = args.batch_size or (32 if args.quick else 64)
    args.batches = args.batches or (8 if args.quick else 40)
    args.steps = args.steps or (4 if args.quick else 20)
    args.workers = [int(w) for w in str(args.workers).split(",")]
    return args


def stage_rows(shards: list[str], img_size: int, limit: int) -> list[dict]:
    """Images/s of shard reading, decoding and augmentation, each over the same images."""
    start = time.perf_counter()
    samples = []
    for shard in shards:
        for sample in read_shard(shard):
            samples.append(sample)
            if len(samples) >= limit:
                break
        if len(samples) >= limit:
            break
    read_s = time.perf_counter() - start
    encoded = [found[1] for s in samples if (found := image_bytes(s)) is not None]
    start = time.perf_counter()
    images = []
    for data in encoded:
        with contextlib.suppress(Exception):
            images.append(decode_image(data))
    decode_s = time.perf_counter() - start
    transform = train_transform(img_size)
    start = time.perf_counter()
    for img in images:
        transform(img)
    augment_s = time.perf_counter() - start
    total = read_s + decode_s + augment_s
    return [
        {"stage": "shard read (tar)", "images": len(samples), "s": read_s,
         "img/s": len(samples) / read_s},
        {"stage": "decode", "images": len(encoded), "s": decode_s,
         "img/s": len(encoded) / decode_s},
        {"stage": f"augment -> {img_size} px", "images": len(images), "s": augment_s,
         "img/s": len(images) / augment_s},
        {"stage": "read + decode + augment", "images": len(images), "s": total,
         "img/s": len(images) / total},
    ]


def loader_alone(loader: ResumableLoader, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, steady images/s over the next ``batches`` batches)."""
    start = time.perf_counter()
    it = iter(loader)
    try:
        next(it)
        first = time.perf_counter() - start
        start = time.perf_counter()
        count = sum(next(it).shape[0] for _ in range(batches))
        return first, count / (time.perf_counter() - start)
    finally:
        it.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if want_cuda else "cpu")

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=want_cuda)

    cfg = get_config(args.preset)
    print(environment_line(device))

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if args.shards:
            shards = list_shards(args.shards)
            origin = f"{args.shards} ({len(shards)} shards)"
        else:
            start = time.perf_counter()
            per_shard = max(1, -(-args.pool_size // args.num_shards))
            shards = write_shards(
                synthetic_pool(args.pool_size, args.source_size, args.seed), str(Path(tmp)),
                samples_per_shard=per_shard, prefix="bench",
            )
            origin = (f"synthetic pool of {args.pool_size} JPEGs at {args.source_size} px in "
                      f"{len(shards)} shards (written in {time.perf_counter() - start:.1f} s)")
        print(f"# {origin} | preset {args.preset} (img {cfg.img_size}) | batch "
              f"{args.batch_size} | shuffle buffer {args.shuffle_buffer} | timed batches "
              f"{args.batches}, fed steps {args.steps}")

        stages = stage_rows(shards, cfg.img_size, limit=args.batch_size * args.batches)

        model = AIM(cfg).to(device).train()
        train = training_step(model, LossModule(model), adamw(model, device), cfg.num_patches,
                              torch.Generator().manual_seed(args.seed), autocast)

        def step(batch: torch.Tensor) -> None:
            train(batch.to(device, non_blocking=True))

        images = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size,
                             device=device)
        for _ in range(2):
            step(images)

        rows = []
        memory_times: list[float] = []
        for workers in args.workers:

            def make_loader(workers: int = workers) -> ResumableLoader:
                return ResumableLoader(
                    ShardSource(shards), cfg.img_size, args.batch_size, seed=args.seed,
                    num_workers=workers, shuffle_buffer=args.shuffle_buffer,
                    pin_memory=device.type == "cuda",
                )

            first, loader_ips = loader_alone(make_loader(), args.batches)
            it = iter(make_loader())
            try:
                step(next(it))  # start-up, not timed
                fed, memory = [], []
                for _ in range(args.steps):  # interleaved: in-memory step, loader-fed step
                    memory.append(time_call(lambda: step(images), device))
                    fed.append(time_call(lambda it=it: step(next(it)), device))
            finally:
                it.close()
            memory_times += memory
            memory_ips = args.batch_size / stats(memory).median
            fed_ips = args.batch_size / stats(fed).median
            rows.append({
                "workers": workers, "first batch s": first, "loader img/s": loader_ips,
                "step img/s": memory_ips, "loader / step": loader_ips / memory_ips,
                "fed step img/s": fed_ips, "fed / in-memory": fed_ips / memory_ips,
                "keeps up": "yes" if fed_ips >= KEEPS_UP * memory_ips else "no",
            })
        step_ips = args.batch_size / stats(memory_times).median

    print("\n## stages, one process")
    print_table(stages, [("stage", "stage", ""), ("images", "images", "d"), ("s", "seconds", ".2f"),
                         ("img/s", "img/s", ".0f")])
    print(f"\n## training loader vs the {args.preset} training step (batch {args.batch_size})")
    print_table(rows, [
        ("workers", "workers", "d"), ("first batch s", "first batch s", ".2f"),
        ("loader img/s", "loader img/s", ".0f"), ("step img/s", "step img/s (in-memory)", ".0f"),
        ("loader / step", "loader / step", ".2f"), ("fed step img/s", "step fed by loader img/s",
                                                    ".0f"),
        ("fed / in-memory", "fed / in-memory", ".2f"), ("keeps up", "keeps up", ""),
    ])
    best = max(rows, key=lambda r: r["fed / in-memory"])
    fastest = max(rows, key=lambda r: r["loader img/s"])
    verdict = (
        "keeps up" if best["keeps up"] == "yes"
        else f"slows the step by {1 - best['fed / in-memory']:.0%}"
    )
    summary(
        f"loader {fastest['loader img/s']:.0f} img/s ({fastest['workers']} workers) = "
        f"{fastest['loader img/s'] / step_ips:.1f}x the {args.preset} step ({step_ips:.0f} img/s) "
        f"| fed step at best {best['fed / in-memory']:.2f} of in-memory ({best['workers']} "
        f"workers): {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
