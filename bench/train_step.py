"""Time one full AIM training step against timm's ViT of the same trunk, in one process.

A step is what ``aim_kedro.aim.train`` does per optimizer step: zero the grads, forward + loss
under autocast, backward, grad-norm clip (1.0), AdamW step (betas 0.9/0.95, weight decay 0.05 on
matrices only, fused on CUDA).

* AIM: ``aim_kedro.aim.model.AIM`` on a freshly sampled prefix per step (``sample_prefix_len``,
  prefix-causal mask built inside ``AIM.forward``), pixel head, ``AIM.loss``.
* ViT: timm ``VisionTransformer`` with the same width, depth, heads, MLP ratio and patch size,
  no class token, no pooling, no classifier, bidirectional attention; loss = mean(output**2)
  (only there to have a backward).

Variants are timed interleaved (A B A B ...) after warm-up; each sample is the mean of enough
back-to-back steps to last ``--min-sample-seconds``. The table gives the median step time and its
inter-quartile range (IQR), images/s, the ratio to the ViT (median over rounds of the per-round
ratio, which cancels load drift between rounds) and model FLOPs:

    FLOPs/step = 6 * B * N * P_mm + 12 * B * N^2 * D * depth

``P_mm`` = weights of every Linear and the patch Conv2d (trunk, and for AIM the pixel head), so
``6 * B * N * P_mm`` is forward (2 per multiply-add) + backward (2x forward) of all matmuls over
B images of N tokens; ``12 * B * N^2 * D * depth`` is attention's QK^T and AV, forward +
backward, counted DENSE (the prefix-causal mask's skipped blocks are not subtracted, as in
PaLM's MFU; for aim_600M attention is ~3% of the total). Norms, softmax, loss and the optimizer
are not counted. MFU = achieved model FLOP/s / the device's dense bf16 peak (``--peak-tflops``
or the table below by device name). ``--count-flops`` cross-checks the formula with
``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward.

``--breakdown`` adds the AIM trunk alone (bidirectional, and with the prefix-causal mask, loss =
mean(features**2)), which splits the AIM/ViT gap into mask cost and head cost; ``--profile``
prints the top ops of each variant (torch.profiler).

    .venv/bin/python bench/train_step.py --quick
    .venv/bin/python bench/train_step.py --preset aim_vitb --batch-size 8 --breakdown
    .venv/bin/python bench/train_step.py --preset aim_600M --batch-size 64   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _common import Stats, environment_line, print_table, stats, summary, synchronize, time_call
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from aim_kedro.aim.distributed import LossModule
from aim_kedro.aim.masks import sample_prefix_len
from aim_kedro.aim.model import AIM, AIMTrunk, PixelHead
from aim_kedro.aim.presets import PRESETS, AIMConfig, get_config
from aim_kedro.common.training import param_groups

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order as substrings of
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
KNOWN_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
)

# Default batch per preset when --batch-size is not given: (cpu, cpu --quick, cuda).
DEFAULT_BATCH: dict[str, tuple[int, int, int]] = {
    "aim_tiny": (64, 32, 256),
    "aim_sample": (64, 32, 256),
    "aim_vitb": (8, 2, 128),
}
DEFAULT_BATCH_LARGE = (2, 1, 64)

ADAMW_BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.05
GRAD_CLIP = 1.0
TARGET_RATIO = 1.15


def peak_tflops_for(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak to compute MFU against and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "none for CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peak in KNOWN_PEAK_TFLOPS:
        if key in name:
            return peak, f"table entry {key!r} for {name!r}"
    return None, f"unknown device {name!r} (pass --peak-tflops)"


def matmul_weights(build: Callable[[], nn.Module]) -> int:
    """Multiply-adds per token of every Linear and Conv2d of the module ``build()`` makes (= their
    weight counts; the patch conv runs once per token). Built on the meta device: no memory."""
    with torch.device("meta"):
        module = build()
    return sum(
        m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)
    )


def step_flops(p_mm: int, batch: int, cfg: AIMConfig) -> float:
    """Model FLOPs of one forward + backward: 6 B N P_mm + 12 B N^2 D depth (dense attention)."""
    n = cfg.num_patches
    return 6.0 * batch * n * p_mm + 12.0 * batch * n * n * cfg.embed_dim * cfg.depth


def build_vit(cfg: AIMConfig) -> VisionTransformer:
    """timm's ViT with AIM's trunk shape: no class token, no pooling, no classifier."""
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        class_token=False,
        global_pool="",
        num_classes=0,
    )


class SquareLoss(nn.Module):
    """mean(features**2) of a trunk: a stand-in loss so there is a backward.

    ``masked=True`` (AIM trunk only) applies the prefix-causal mask built from ``prefix_len``.
    """

    def __init__(self, trunk: nn.Module, masked: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.masked = masked

    def forward(self, images: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        if self.masked:
            out = self.trunk(images, self.trunk.build_attn_mask(prefix_len))
        else:
            out = self.trunk(images)
        return out.float().pow(2).mean()


@dataclass
class Variant:
    """One model under test: its loss module, optimizer and measurements."""

    name: str
    backend: str
    model: nn.Module
    loss_module: nn.Module
    flops: float
    params: int
    samples: list[float] = field(default_factory=list)
    inner: int = 1
    peak_mem_gib: float | None = None
    counted_flops: float | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: Callable[[], None] | None = None


def training_step(
    model: nn.Module,
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_tokens: int,
    gen: torch.Generator,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Callable[[torch.Tensor], None]:
    """The optimizer step of ``aim_kedro.aim.train`` on a batch (fresh prefix each call)."""

    def step(images: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        prefix = sample_prefix_len(images.shape[0], num_tokens, generator=gen).to(images.device)
        with autocast():
            loss = loss_module(images, prefix)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


def adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the training loop builds it (decay on matrices only, fused on CUDA)."""
    return torch.optim.AdamW(
        param_groups(model, WEIGHT_DECAY), lr=1e-4, betas=ADAMW_BETAS, fused=device.type == "cuda"
    )


def build_variants(
    cfg: AIMConfig, backends: list[str], breakdown: bool
) -> list[tuple[str, str, Callable[[], tuple[nn.Module, nn.Module]], int]]:
    """(name, backend, builder, matmul weights) of each variant; built lazily, one at a time."""
    out = []

    def vit() -> tuple[nn.Module, nn.Module]:
        model = build_vit(cfg)
        return model, SquareLoss(model)

    vit_mm = matmul_weights(lambda: build_vit(cfg))
    out.append(("vit", "sdpa", vit, vit_mm))
    for backend in backends:
        bcfg = get_config_with(cfg, attn_backend=backend)

        def aim(bcfg: AIMConfig = bcfg) -> tuple[nn.Module, nn.Module]:
            model = AIM(bcfg)
            return model, LossModule(model)

        out.append(("aim", backend, aim, matmul_weights(lambda bcfg=bcfg: AIM(bcfg))))
        if breakdown:

            def trunk_bidir(bcfg: AIMConfig = bcfg) -> tuple[nn.Module, nn.Module]:
                model = AIMTrunk(bcfg)
                return model, SquareLoss(model)

            def trunk_prefix(bcfg: AIMConfig = bcfg) -> tuple[nn.Module, nn.Module]:
                model = AIMTrunk(bcfg)
                return model, SquareLoss(model, masked=True)

            trunk_mm = matmul_weights(lambda bcfg=bcfg: AIMTrunk(bcfg))
            if backend == backends[0]:
                out.append(("aim trunk, bidirectional", "sdpa", trunk_bidir, trunk_mm))
            out.append(("aim trunk, prefix mask", backend, trunk_prefix, trunk_mm))
    return out


def get_config_with(cfg: AIMConfig, **overrides: object) -> AIMConfig:
    """``cfg`` with some fields replaced (validated)."""
    return AIMConfig.from_dict({**cfg.to_dict(), **overrides})


def count_flops(variant: Variant, images: torch.Tensor, num_tokens: int) -> float:
    """FLOPs of one forward + backward counted by FlopCounterMode (matmuls and attention).

    On CPU the fused SDPA kernel is not counted by FlopCounterMode, so SDPA is forced to its
    math path (plain bmm) for this one pass.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    prefix = sample_prefix_len(images.shape[0], num_tokens).to(images.device)
    kernel = (
        sdpa_kernel([SDPBackend.MATH]) if images.device.type == "cpu" else contextlib.nullcontext()
    )
    with kernel, FlopCounterMode(display=False) as counter:
        variant.loss_module(images, prefix).backward()
    variant.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def profile_variant(variant: Variant, device: torch.device, steps: int, rows: int) -> None:
    """Print the top ops (self time) of ``steps`` training steps of one variant."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort_by = "self_device_time_total"
    assert variant.step is not None
    with profile(activities=activities) as prof:
        for _ in range(steps):
            variant.step()
        synchronize(device)
    print(f"\n## profile: {variant.name} ({variant.backend}), {steps} steps, top {rows} by {sort_by}")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["head_depth=2", "mlp_ratio=4.0"]`` -> ``{"head_depth": 2, "mlp_ratio": 4.0}``."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out[key.strip()] = value
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="aim_sample", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an AIMConfig field of the preset, e.g. --set "
                             "head_depth=2 (repeatable; values parsed as int/float)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step (default: per preset and device)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto = bf16 autocast on CUDA, fp32 on CPU (as the training loop)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated AIM attention backends (default: sdpa on CPU, "
                             "sdpa,flex on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per variant")
    parser.add_argument("--min-sample-seconds", type=float, default=None,
                        help="each sample averages enough steps to last this long")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak (dense bf16 TFLOP/s) for MFU; default from the "
                             "device name (H100 SXM: 989.4)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each loss module")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the AIM trunk alone (bidirectional / prefix mask)")
    parser.add_argument("--count-flops", action="store_true",
                        help="cross-check the FLOP formula with FlopCounterMode")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--target", type=float, default=TARGET_RATIO,
                        help="AIM/ViT step-time ratio to judge against (default 1.15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and a smaller default batch (< 1 min on 2 cores)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    if args.min_sample_seconds is None:
        args.min_sample_seconds = 0.1 if args.quick else 0.3
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    backends = (args.backends.split(",") if args.backends
                else (["sdpa", "flex"] if device.type == "cuda" else ["sdpa"]))
    if "flex" in backends and device.type != "cuda":
        print("attn_backend 'flex' needs CUDA; use --backends sdpa on CPU", file=sys.stderr)
        return 2
    cfg = get_config(args.preset, **parse_overrides(args.set))
    if args.batch_size is None:
        cpu, cpu_quick, cuda = DEFAULT_BATCH.get(args.preset, DEFAULT_BATCH_LARGE)
        args.batch_size = cuda if device.type == "cuda" else (cpu_quick if args.quick else cpu)
    batch, n_tok = args.batch_size, cfg.num_patches
    peak, peak_source = peak_tflops_for(device, args.peak_tflops)

    print(environment_line(device))
    overridden = f" (--set {', '.join(args.set)})" if args.set else ""
    print(f"# preset {args.preset}{overridden}: img {cfg.img_size}, patch {cfg.patch_size}, "
          f"N {n_tok}, D {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, head "
          f"{cfg.head_depth} x {cfg.head_embed_dim} | batch {batch} | "
          f"{'bf16 autocast' if bf16 else 'fp32'} | compile {args.compile} | "
          f"warm-up {args.warmup}, repeats {args.repeats} | peak: {peak_source}")

    torch.manual_seed(args.seed)
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    gen = torch.Generator().manual_seed(args.seed)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    variants: list[Variant] = []
    for name, backend, builder, p_mm in build_variants(cfg, backends, args.breakdown):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with device:
            model, loss_module = builder()
        model.to(device).train()
        v = Variant(name, backend, model, loss_module, step_flops(p_mm, batch, cfg),
                    sum(p.numel() for p in model.parameters()))
        if args.count_flops:  # on the eager module: compiled kernels are not counted
            try:
                v.counted_flops = count_flops(v, images, n_tok)
            except Exception as exc:  # noqa: BLE001 - a cross-check must not stop the benchmark
                print(f"# FlopCounterMode failed for {name} ({backend}): {exc!r}")
        if args.compile:
            v.loss_module = torch.compile(loss_module)
        v.optimizer = adamw(model, device)
        train = training_step(model, v.loss_module, v.optimizer, n_tok, gen, autocast)
        v.step = functools.partial(train, images)
        for _ in range(args.warmup):
            v.step()
        one = time_call(v.step, device)
        v.inner = max(1, math.ceil(args.min_sample_seconds / max(one, 1e-6)))
        if device.type == "cuda":
            v.peak_mem_gib = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        variants.append(v)

    for _ in range(args.repeats):  # interleaved: A B C ... A B C ...
        for v in variants:
            assert v.step is not None
            v.samples.append(time_call(v.step, device, v.inner))

    if args.profile:
        for v in variants:
            profile_variant(v, device, steps=max(2, min(v.inner, 5)), rows=args.profile_rows)

    print_flops_table(variants, cfg, batch)
    results = report(variants, batch, peak, args.count_flops)
    print()
    print_table(results, columns(peak is not None, device.type == "cuda", args.count_flops))
    summary(summary_line(args, results, device, bf16, batch))
    return 0


def print_flops_table(variants: list[Variant], cfg: AIMConfig, batch: int) -> None:
    """Per-image model GFLOPs of a step, split into trunk matmuls, attention and pixel head."""
    n, d = cfg.num_patches, cfg.embed_dim
    attention = 12.0 * n * n * d * cfg.depth
    trunk_mm = 6.0 * n * matmul_weights(lambda: AIMTrunk(cfg))
    head_mm = 6.0 * n * matmul_weights(
        lambda: PixelHead(d, cfg.head_embed_dim, cfg.head_depth, cfg.patch_dim, cfg.mlp_ratio)
    )
    vit_mm = 6.0 * n * matmul_weights(lambda: build_vit(cfg))
    rows = [
        {"model": "vit", "trunk": vit_mm / 1e9, "attention": attention / 1e9, "head": 0.0,
         "total": (vit_mm + attention) / 1e9, "vs vit": 1.0},
        {"model": "aim", "trunk": trunk_mm / 1e9, "attention": attention / 1e9,
         "head": head_mm / 1e9, "total": (trunk_mm + attention + head_mm) / 1e9,
         "vs vit": (trunk_mm + attention + head_mm) / (vit_mm + attention)},
    ]
    print(f"\n## model GFLOPs per image per step (fwd + bwd; batch {batch} -> x{batch})")
    print_table(rows, [("model", "model", ""), ("trunk", "trunk matmuls", ".4g"),
                       ("attention", "attention (dense)", ".4g"), ("head", "pixel head", ".4g"),
                       ("total", "total", ".4g"), ("vs vit", "FLOPs vs vit", ".3f")])


def report(variants: list[Variant], batch: int, peak: float | None, counted: bool) -> list[dict]:
    """One row per variant. "time vs vit" is the median over repeats of (this variant's step
    time / the ViT's step time in the same round): pairing cancels load drift between rounds."""
    vit = next(v for v in variants if v.name == "vit")
    rows = []
    for v in variants:
        s: Stats = stats(v.samples)
        paired = stats([a / b for a, b in zip(v.samples, vit.samples, strict=True)])
        achieved = v.flops / s.median / 1e12
        rows.append({
            "model": v.name,
            "backend": v.backend,
            "params (M)": v.params / 1e6,
            "step ms": s.median * 1e3,
            "IQR ms": s.iqr * 1e3,
            "n": f"{s.n}x{v.inner}",
            "img/s": batch / s.median,
            "vs vit": paired.median,
            "ratio IQR": paired.iqr,
            "GFLOP/step": v.flops / 1e9,
            "counted GFLOP": v.counted_flops / 1e9 if counted and v.counted_flops else None,
            "TFLOP/s": achieved,
            "MFU %": 100.0 * achieved / peak if peak else None,
            "mem GiB": v.peak_mem_gib,
        })
    return rows


def columns(mfu: bool, cuda: bool, counted: bool) -> list[tuple[str, str, str]]:
    cols = [("model", "model", ""), ("backend", "backend", ""), ("params (M)", "params M", ".2f"),
            ("step ms", "step ms (median)", ".2f"), ("IQR ms", "IQR ms", ".2f"),
            ("n", "samples x steps", ""), ("img/s", "img/s", ".1f"),
            ("vs vit", "time vs vit", ".3f"), ("ratio IQR", "ratio IQR", ".3f"),
            ("GFLOP/step", "GFLOP/step", ".4g")]
    if counted:
        cols.append(("counted GFLOP", "counted GFLOP", ".4g"))
    cols.append(("TFLOP/s", "TFLOP/s", ".3g"))
    if mfu:
        cols.append(("MFU %", "MFU %", ".1f"))
    if cuda:
        cols.append(("mem GiB", "peak mem GiB", ".2f"))
    return cols


def summary_line(args: argparse.Namespace, rows: list[dict],
                 device: torch.device, bf16: bool, batch: int) -> str:
    aim_rows = [r for r in rows if r["model"] == "aim"]
    ratios = ", ".join(f"{r['vs vit']:.2f} {r['backend']}" for r in aim_rows)
    verdict = "; ".join(
        f"target <= {args.target:g} {'met' if r['vs vit'] <= args.target else 'MISSED'}"
        + (f" ({r['backend']})" if len(aim_rows) > 1 else "")
        for r in aim_rows
    )
    mfu = ", ".join(f"{r['MFU %']:.1f}% {r['backend']}" for r in aim_rows
                    if r["MFU %"] is not None)
    parts = [f"{args.preset}/vit step ratio {ratios}", verdict]
    if mfu:
        parts.append(f"AIM MFU {mfu}")
    parts.append(f"{device.type} {'bf16' if bf16 else 'fp32'} batch {batch}")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
