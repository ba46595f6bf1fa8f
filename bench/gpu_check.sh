#!/usr/bin/env bash
# Every GPU check of the project in one run, ending with one table and a one-line summary:
#   1. aim_600M training step, bf16, torch.compile'd: MFU with attn_backend sdpa and flex
#      (bench/train_step.py; MFU against the device's dense bf16 peak; goal >= 50%);
#   2. CLIP scoring img/s (the curation scorer: decode, preprocess, encode, score) for
#      ViT-B-32 and ViT-L-14 with random weights (no download), batch 256, bf16;
#   3. the pre-training loader at 224 px (bench/loader.py: loader img/s, and whether it keeps
#      the aim_600M step fed);
#   4. pre-training under torchrun with DDP and with FSDP2 on every GPU present (aim_600M,
#      bf16, a few steps; img/s of the last logged steps).
#
#   bench/gpu_check.sh                # on a GPU machine, from the repository root
#   bench/gpu_check.sh --smoke-cpu    # the same steps at toy sizes on the CPU: checks the
#                                     # script, measures nothing
# Without a visible CUDA GPU (and without --smoke-cpu) it prints one line and exits 0.
# Environment: PYTHON (default .venv/bin/python), GPU_CHECK_OUT (default a temp folder; each
# check's full output is kept there), GPU_CHECK_STEPS (default 30, distributed steps).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SMOKE=0
case "${1:-}" in
  --smoke-cpu) SMOKE=1 ;;
  "") ;;
  -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
  *) echo "gpu_check: unknown argument $1 (use --smoke-cpu or nothing)" >&2; exit 2 ;;
esac

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)") || {
  echo "gpu_check: cannot run $PY with torch" >&2; exit 2; }
if [ "$GPUS" = 0 ] && [ "$SMOKE" = 0 ]; then
  echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to measure"
  exit 0
fi
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
STEPS=${GPU_CHECK_STEPS:-30}
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; NPROC=2; PRESET=aim_tiny; STEPS=4
  echo "# gpu_check --smoke-cpu: toy sizes on the CPU, the figures mean nothing"
else
  DEVICE=cuda; NPROC=$GPUS; PRESET=aim_600M
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/# gpu /'
fi
"$PY" -c "import platform, torch; print(f'# {platform.node()} | torch {torch.__version__} | cuda {torch.version.cuda} | GPUs $GPUS')"
ROWS="$OUT/rows.tsv"
: > "$ROWS"

row() {  # check, what, figure, status (a "|" inside a field would split the table's cell)
  printf '%s\t%s\t%s\t%s\n' "${1//|//}" "${2//|//}" "${3//|//}" "${4//|//}" >> "$ROWS"
}

last_line() {  # the one-line summary a bench script ends with
  tail -n 1 "$1" 2>/dev/null
}

# 1. MFU of the aim_600M step (sdpa and flex, compiled)
if [ "$SMOKE" = 1 ]; then
  STEP_ARGS=(--preset aim_tiny --quick --device cpu --backends sdpa)
else
  STEP_ARGS=(--preset aim_600M --batch-size 64 --device cuda --backends sdpa,flex --compile)
fi
echo "## 1/4 train_step ${STEP_ARGS[*]}"
if "$PY" bench/train_step.py "${STEP_ARGS[@]}" > "$OUT/train_step.log" 2>&1; then
  line=$(last_line "$OUT/train_step.log")
  mfu=$(sed -n 's/.*AIM MFU \([^|]*\).*/\1/p' <<< "$line")
  row "aim step MFU" "$PRESET $([ "$SMOKE" = 1 ] && echo 'fp32 CPU, sdpa' || echo 'bf16 compiled, sdpa / flex')" "${mfu:-n/a (no peak for this device)}" ok
else
  row "aim step MFU" "$PRESET" "-" "FAILED (see $OUT/train_step.log)"
fi
cat "$OUT/train_step.log" | tail -n 12

# 2. CLIP scoring throughput with random weights
echo "## 2/4 CLIP scoring"
"$PY" - "$DEVICE" "$SMOKE" > "$OUT/clip.log" 2>&1 <<'PYEOF'
import sys, time

import numpy as np

from aim_kedro.curation.clip_models import load_clip_model
from aim_kedro.curation.scoring import iter_score_batches
from aim_kedro.pipelines.sample import sources

device, smoke = sys.argv[1], sys.argv[2] == "1"
batch, n = (8, 16) if smoke else (256, 256 * 12)
rng = np.random.default_rng(0)
records = []
for i in range(n):  # photo crops at 256 px as JPEG, with a caption: what the scorer decodes
    r = sources.render_photo(list(sources.PHOTO_SOURCES)[i % len(sources.PHOTO_SOURCES)], 256, rng)
    records.append((f"uid{i}", sources.encode(r.image), r.caption))
for name in (["ViT-B-32"] if smoke else ["ViT-B-32", "ViT-L-14"]):
    scorer = load_clip_model(name, None, device=device, precision="fp32" if smoke else "bf16",
                             batch_size=batch)
    next(iter_score_batches(scorer, records[:batch], batch))  # warm-up
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
    start = time.perf_counter()
    scored = sum(len(part["uid"]) for part in iter_score_batches(scorer, records, batch))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"CLIPRATE {name} {scored / seconds:.0f} img/s (batch {batch}, {scored} images, {seconds:.1f} s)")
PYEOF
if [ $? = 0 ]; then
  while read -r _ name ips _; do
    row "CLIP scoring" "$name, random weights, batch $([ "$SMOKE" = 1 ] && echo 8 || echo 256)" "$ips img/s" ok
  done < <(grep '^CLIPRATE ' "$OUT/clip.log")
else
  row "CLIP scoring" "ViT-B-32 / ViT-L-14" "-" "FAILED (see $OUT/clip.log)"
fi
cat "$OUT/clip.log" | tail -n 4

# 3. the pre-training loader at 224 px
if [ "$SMOKE" = 1 ]; then
  LOADER_ARGS=(--quick --preset aim_tiny --workers 0,1 --device cpu)
else
  LOADER_ARGS=(--preset aim_600M --batch-size 64 --source-size 256 --pool-size 4096 --workers 4,8,12 --device cuda)
fi
echo "## 3/4 loader ${LOADER_ARGS[*]}"
if "$PY" bench/loader.py "${LOADER_ARGS[@]}" > "$OUT/loader.log" 2>&1; then
  row "loader" "$PRESET at $([ "$SMOKE" = 1 ] && echo 16 || echo 224) px" "$(last_line "$OUT/loader.log" | cut -c1-90)" ok
else
  row "loader" "$PRESET" "-" "FAILED (see $OUT/loader.log)"
fi
cat "$OUT/loader.log" | tail -n 6

# 4. DDP and FSDP2 under torchrun on the GPUs present
echo "## 4/4 torchrun DDP and FSDP2 on $NPROC process(es)"
"$PY" - "$DEVICE" "$NPROC" "$PRESET" "$STEPS" "$OUT" > "$OUT/distributed.log" 2>&1 <<'PYEOF'
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from _common import synthetic_pool  # noqa: E402

from aim_kedro.aim.data import split_sources  # noqa: E402
from aim_kedro.aim.launch import launch_torchrun  # noqa: E402
from aim_kedro.aim.train import TrainConfig  # noqa: E402
from aim_kedro.io.shards import write_shards  # noqa: E402

device, nproc, preset, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
cpu = device == "cpu"
size, n, per_rank = (32, 256, 4) if cpu else (256, 4096, 32)
shards = write_shards(synthetic_pool(n, size), str(out / "shards"), samples_per_shard=max(16, n // (8 * nproc)))
train_src, val_src = split_sources(shards, val_percent=5.0)
for mode in ("ddp", "fsdp2"):
    cfg = TrainConfig(
        preset=preset, batch_size=per_rank * nproc, total_steps=steps, warmup_steps=1,
        device=device, precision="fp32" if cpu else "bf16", distributed=mode,
        num_workers=0 if cpu else 6, shuffle_buffer=64 if cpu else 512, checkpoint_every=0,
        keep_every=0, val_every=0, val_batches=1, log_every=max(1, steps // 3), progress=False,
        resume=False,
    )
    result = launch_torchrun(cfg, nproc, out / f"run_{mode}", train_src, val_src)
    rates = [r["images_per_s"] for r in result.history if r.get("images_per_s")]
    world = result.metadata["world_size"]
    note = "" if world > 1 else " (world size 1: aim.distributed.setup trains unwrapped)"
    print(f"DIST {mode} {rates[-1]:.0f} img/s world {world} steps {result.metadata['steps']}{note}")
PYEOF
if [ $? = 0 ]; then
  while read -r _ mode ips _ _ world rest; do
    row "torchrun $mode" "$PRESET, $world process(es), per-rank batch $([ "$SMOKE" = 1 ] && echo 4 || echo 32)" "$ips img/s" "ok${rest#* $STEPS}"
  done < <(grep '^DIST ' "$OUT/distributed.log")
else
  row "torchrun ddp/fsdp2" "$PRESET on $NPROC process(es)" "-" "FAILED (see $OUT/distributed.log)"
fi
grep '^DIST \|Error\|error' "$OUT/distributed.log" | tail -n 4

echo
echo "| check | what | figure | status |"
echo "|---|---|---|---|"
awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$ROWS"
failed=$(grep -c 'FAILED' "$ROWS" || true)
echo "# full outputs in $OUT"
summary=$(awk -F'\t' '{printf "%s%s: %s", (NR > 1 ? " | " : ""), $1, $3}' "$ROWS")
echo "gpu_check$([ "$SMOKE" = 1 ] && echo ' (smoke, CPU)'): $summary | $failed failed"
[ "$failed" = 0 ]
