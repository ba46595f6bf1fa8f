"""The paper presets exercised on CPU: one optimizer step, the checkpoint round trip, the export.

For each preset (default: the paper presets, aim_600M ... aim_7B, that fit this machine's
memory; the others get a row saying what they would need), in a FRESH subprocess so that each
peak RSS is its own:

1. build ``aim_kedro.aim.model.AIM`` of the preset (Apple's choices: ml-l3m's pixel head and
   xavier init) and run ONE optimizer step as ``aim_kedro.aim.train`` does: prefix drawn per
   sample, ``AIM.loss``, backward, grad-norm clip 1.0, AdamW (betas 0.9/0.95, weight decay
   0.05 on matrices) at the preset recipe's step-0 lr; the first step allocates AdamW's state;
2. free the optimizer state and gradients, save ``{config, state_dict, metadata}`` through the
   catalog's ``AIMCheckpointDataset`` (safetensors + JSON), load it back and check every tensor;
3. export the trunk to the published AIM v1 (ml-aim) format (``interop.to_ml_aim``, written as
   safetensors), read it back with ``interop.load_aim_v1_checkpoint`` and run one attentive-probe
   forward (eval, bidirectional) on the batch, checking the trunk's blocks against the model's.

The table gives build and step time (wall and CPU seconds), peak RSS (the subprocess's
``ru_maxrss``), the AIM checkpoint and the ml-aim export sizes, and the probe forward time. A
preset is run when ``16 bytes x parameters`` (weights, gradients, AdamW's two moments, fp32)
plus 3 GiB fits the available memory; ``--force`` runs it anyway.

    .venv/bin/python bench/presets.py --quick                    # aim_600M's step, batch 1
    .venv/bin/python bench/presets.py                            # every paper preset that fits, batch 2
    .venv/bin/python bench/presets.py --presets aim_vitb,aim_tiny   # the same path on small presets

aim_600M (1.09B parameters with its 12 x 2048 head) needs ~19 GiB: do not run it beside other
memory-hungry jobs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment_line, fmt, peak_rss_mib, print_table, summary
from kedro.io import Version
from safetensors.torch import save_file

from aim_kedro.aim.interop import load_aim_v1_checkpoint, to_ml_aim
from aim_kedro.aim.masks import sample_prefix_len
from aim_kedro.aim.model import AIM
from aim_kedro.aim.presets import PAPER_PRESETS, PRESETS, get_config
from aim_kedro.aim.train import TrainConfig, lr_at
from aim_kedro.common.training import param_groups
from aim_kedro.datasets.checkpoints import AIMCheckpointDataset

BYTES_PER_PARAM = 16  # fp32 weights + gradients + AdamW exp_avg + exp_avg_sq
HEADROOM_GIB = 3.0
NUM_CLASSES = 10
RESULT = "RESULT "


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def available_gib() -> float | None:
    """``MemAvailable`` (Linux), in GiB; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def count_params(preset: str) -> int:
    """Parameters of the preset's AIM (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in AIM(get_config(preset)).parameters())


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(preset: str, batch: int, grad_checkpointing: bool) -> dict[str, Any]:
    """The three stages for one preset in this process; returns the row of the table."""
    cfg = get_config(preset)
    row: dict[str, Any] = {"preset": preset, "batch": batch, "img": cfg.img_size,
                           "patch": cfg.patch_size}
    torch.manual_seed(0)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    model = AIM(cfg, grad_checkpointing=grad_checkpointing).train()
    row["build_s"] = time.perf_counter() - start
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    recipe_lr = lr_at(0, TrainConfig(preset=preset, batch_size=batch))
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=recipe_lr, betas=(0.9, 0.95))
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    prefix = sample_prefix_len(batch, cfg.num_patches, generator=torch.Generator().manual_seed(0))
    start, cpu1 = time.perf_counter(), cpu_seconds()
    loss = model.loss(images, prefix)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    row["step_s"] = time.perf_counter() - start
    row["step_cpu_s"] = cpu_seconds() - cpu1
    row["loss"] = float(loss)
    row["step_peak_rss_gib"] = peak_rss_mib() / 1024
    del optimizer, loss
    model.zero_grad(set_to_none=True)
    gc.collect()

    with tempfile.TemporaryDirectory(prefix="bench_presets_") as tmp:
        dataset = AIMCheckpointDataset(filepath=str(Path(tmp) / "aim_checkpoint"),
                                       version=Version(None, None))
        state = model.state_dict()
        start = time.perf_counter()
        dataset.save({"config": {**cfg.to_dict(), "preset": preset}, "state_dict": state,
                      "metadata": {"step": 1}})
        row["save_s"] = time.perf_counter() - start
        row["ckpt_gib"] = folder_bytes(Path(tmp) / "aim_checkpoint") / 2**30
        loaded = dataset.load()
        same = loaded["state_dict"].keys() == state.keys() and all(
            torch.equal(loaded["state_dict"][k], v) for k, v in state.items())
        row["reload"] = "equal" if same and loaded["config"]["preset"] == preset else "DIFFERS"
        del loaded
        gc.collect()

        export = Path(tmp) / "aim_v1.safetensors"
        save_file({k: v.contiguous() for k, v in to_ml_aim(model).items()}, str(export))
        row["export_gib"] = export.stat().st_size / 2**30
        probe = load_aim_v1_checkpoint(
            export, img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            num_blocks=cfg.depth, num_heads=cfg.num_heads, probe_layers=list(cfg.probe_layers),
            num_classes=NUM_CLASSES).eval()
        start = time.perf_counter()
        with torch.inference_mode():
            logits = probe(images)
            ours = model.eval().trunk.forward_intermediates(images, [cfg.depth - 1])[0]
            theirs = probe.trunk.forward_intermediates(images, [cfg.depth - 1])[0]
        row["probe_s"] = time.perf_counter() - start
        row["export"] = ("equal" if tuple(logits.shape) == (batch, NUM_CLASSES)
                         and torch.equal(ours, theirs) else "DIFFERS")
    row["peak_rss_gib"] = peak_rss_mib() / 1024
    row["cpu_s"] = cpu_seconds() - cpu0
    return row


def spawn(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_one`` in a fresh interpreter (its own peak RSS); a failure becomes a row."""
    command = [sys.executable, __file__, "--one", preset, "--batch-size", str(args.batch_size)]
    if args.grad_checkpointing:
        command.append("--grad-checkpointing")
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    return {"preset": preset, "batch": args.batch_size, "status": f"failed: {tail[0][:80]}"}


COLUMNS = [
    ("preset", "preset", ""), ("params_m", "params (M)", ".1f"), ("batch", "batch", "d"),
    ("img", "px", "d"), ("patch", "patch", "d"), ("build_s", "build s", ".1f"),
    ("step_s", "step s", ".2f"), ("step_cpu_s", "step CPU s", ".1f"),
    ("step_peak_rss_gib", "peak RSS step (GiB)", ".2f"), ("peak_rss_gib", "peak RSS (GiB)", ".2f"),
    ("ckpt_gib", "checkpoint (GiB)", ".3f"), ("reload", "reload", ""),
    ("export_gib", "ml-aim export (GiB)", ".3f"), ("probe_s", "probe fwd s", ".2f"),
    ("export", "export", ""), ("status", "status", ""),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=None,
                        help=f"comma-separated presets (default: {','.join(PAPER_PRESETS)})")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 2; 1 with --quick)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing per block (less memory, a recompute)")
    parser.add_argument("--force", action="store_true", help="run presets that look too big")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="aim_600M only, batch 1")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 1 if args.quick else 2
    names = ["aim_600M"] if args.quick else (
        args.presets.split(",") if args.presets else list(PAPER_PRESETS))
    unknown = [n for n in names if n not in PRESETS]
    if unknown or args.batch_size < 1:
        parser.error(f"unknown presets {unknown}; known: {sorted(PRESETS)}" if unknown
                     else "--batch-size must be >= 1")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(RESULT + json.dumps(run_one(args.one, args.batch_size, args.grad_checkpointing)),
              flush=True)
        return 0
    print(environment_line())
    free = available_gib()
    print(f"# one optimizer step + checkpoint round trip + ml-aim export + probe forward per preset, "
          f"CPU fp32, batch {args.batch_size}, grad checkpointing {args.grad_checkpointing}; "
          f"memory available {fmt(free, '.1f')} GiB")
    rows = []
    for name in args.names:
        need = count_params(name) * BYTES_PER_PARAM / 2**30 + HEADROOM_GIB
        if free is not None and need > free and not args.force:
            rows.append({"preset": name, "params_m": count_params(name) / 1e6, "batch": args.batch_size,
                         "status": f"skipped: needs ~{need:.0f} GiB, {free:.0f} available"})
            continue
        row = spawn(name, args)
        row.setdefault("status", "ok" if row.get("reload") == row.get("export") == "equal" else "check")
        rows.append(row)
        print(f"# {name}: {row['status']}", flush=True)
    print_table(rows, COLUMNS)
    ran = [r for r in rows if "step_s" in r]
    parts = [f"{r['preset']} step {r['step_s']:.1f} s, peak RSS {r['peak_rss_gib']:.1f} GiB, "
             f"checkpoint {r['ckpt_gib']:.2f} GiB" for r in ran]
    skipped = [r["preset"] for r in rows if "step_s" not in r]
    summary(f"presets: {'; '.join(parts) or 'none ran'}"
            + (f" | not run: {', '.join(skipped)}" if skipped else "")
            + f" | batch {args.batch_size}, CPU fp32")
    return 0 if all(r["status"] in ("ok",) or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
