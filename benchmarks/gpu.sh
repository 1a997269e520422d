#!/usr/bin/env bash
# The GPU benchmark set in one prepared run, results under $OUT (or benchmarks/results). Before the two
# device-resize rows took the place of a compiled saturated one it ran in about 7 minutes on an H100, 5 on an H200;
# the last three steps (fp32 throughput, small configs) are new since and are the first a short budget skips.
#
# On a lent GPU machine (no network; its own Python with torch, timm, tqdm, OpenCV): put the wheels it
# lacks in .gpu_wheels/ (hiera-transformer for the official baseline), ignored by git, and carry it:
#     pip download --no-deps -d .gpu_wheels hiera-transformer==0.1.4
#     run: bash benchmarks/gpu.sh          (carry: .gpu_wheels; results in $OUT/gpu_results.tar.gz)
# Checked on CPU before any GPU time is spent:
#     bash benchmarks/gpu.sh --device cpu --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --device) ;;
    cpu|cuda|cuda:*) DEVICE="$arg" ;;
    *) echo "usage: $0 [--device cpu|cuda] [--dry-run]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# The device tool brings back at most 8 files from $OUT: results go to $OUT/results and come back as one tarball.
# A dry run without $OUT writes to a temporary folder: its tiny-model CPU rows must not replace the committed ones.
RESULTS=benchmarks/results
if [ -n "${OUT:-}" ]; then RESULTS="$OUT/results"; elif [ "$DRY" = 1 ]; then RESULTS=$(mktemp -d); fi
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 0 ] && ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  # not fatal: without the official package only its steps fail (the engine's need none)
  $PY -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl || echo "!! pip install of .gpu_wheels failed"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>/dev/null || true

if [ "$DRY" = 1 ]; then
  BASE=hiera_tiny_8x64; REPEATS=2; SECONDS_ENGINE=2; BATCHES="1 4"; THROUGHPUT="4"; SMALL="hiera_tiny_8x64@1,4"
else
  BASE=hiera_base_16x224; REPEATS=20; SECONDS_ENGINE=10; BATCHES="1 8 32 64"; THROUGHPUT="8 32 64"
  SMALL="hiera_tiny_8x64@1,32 hiera_small_16x128@1,32"
fi
# Every step has its own time limit and writes its own file, so one failure costs only its numbers. The whole set
# stops within GPU_BUDGET_S (default 480 s: a step that would start with under 30 s left is skipped, a running one
# is cut at the deadline), and the tarball is packed after every step: a run cut short still brings back what it did.
BUDGET=${GPU_BUDGET_S:-$([ "$DRY" = 1 ] && echo 1800 || echo 480)}
pack() { if [ -n "${OUT:-}" ]; then tar -czf "$OUT/gpu_results.tar.gz.tmp" -C "$RESULTS" . \
  && mv "$OUT/gpu_results.tar.gz.tmp" "$OUT/gpu_results.tar.gz"; fi; }
step() {
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then echo "!! skipped (time budget, ${SECONDS}s of ${BUDGET}s used): $*"; return; fi
  echo "== $*"; timeout $((left < 200 ? left : 200)) "$@" || echo "!! failed: $*"
  pack || echo "!! packing $OUT/gpu_results.tar.gz failed"
}
# encoder, ours vs official eager, same weights: eager and replayed from a CUDA graph; then torch.compile
step $PY -m benchmarks encoder --device "$DEVICE" --precision bf16 --configs $BASE --batch $BATCHES \
  --repeats $REPEATS --cuda-graph --out "$RESULTS"
step $PY -m benchmarks encoder --device "$DEVICE" --precision fp32 --configs $BASE --batch 1 \
  --repeats $REPEATS --cuda-graph --out "$RESULTS"
# MAE training step, mask ratio 0.9: eager and as a captured CUDA graph (forward + backward + AdamW); then with
# the forward compiled
step $PY -m benchmarks mae_step --device "$DEVICE" --precision bf16 --configs $BASE --batch 8 \
  --repeats $REPEATS --cuda-graph --out "$RESULTS"
# engine: 640x480 uint8 frames at 30 fps in, labels out: eager, CUDA graph replay, compiled + replayed;
# paced at 30 fps (a robot's view: the GPU idles between clips) and saturated (clips back to back)
ENGINE="$PY -m benchmarks engine --model $BASE-random --device $DEVICE --precision bf16 --out $RESULTS"
step $ENGINE --seconds $SECONDS_ENGINE --no-cuda-graph
step $ENGINE --seconds $SECONDS_ENGINE --name "engine_${DEVICE%%:*}_bf16_graph"
step $ENGINE --seconds $SECONDS_ENGINE --no-realtime --name "engine_${DEVICE%%:*}_bf16_graph_saturated"
step $ENGINE --seconds $((SECONDS_ENGINE * 3)) --compile --name "engine_${DEVICE%%:*}_bf16_graph_compile"
# the frame that completes a clip shrunk on the GPU instead of the host (on the H100 its push took 2.8-4.0 ms, two resizes;
# these two runs took the place of a compiled saturated one, to stay within 8 minutes)
step $ENGINE --seconds $SECONDS_ENGINE --device-resize --name "engine_${DEVICE%%:*}_bf16_graph_device_resize"
step $ENGINE --seconds $((SECONDS_ENGINE * 3)) --compile --device-resize \
  --name "engine_${DEVICE%%:*}_bf16_graph_compile_device_resize"
# compiled variants last: their compile time is the least predictable
step $PY -m benchmarks encoder --device "$DEVICE" --precision bf16 --configs $BASE --batch 1 \
  --repeats $REPEATS --compile --name "encoder_${DEVICE%%:*}_bf16_compile" --out "$RESULTS"
step $PY -m benchmarks mae_step --device "$DEVICE" --precision bf16 --configs $BASE --batch 8 \
  --repeats $REPEATS --compile --name "mae_step_${DEVICE%%:*}_bf16_compile" --out "$RESULTS"
# the rest of the issue's encoder table, last so that a short budget skips these first: fp32 throughput of base and
# the small configs (the embedded model's and the largest of ours) in both precisions. Each row is saved as timed.
ENCODER="$PY -m benchmarks encoder --device $DEVICE --repeats $((REPEATS / 2)) --cuda-graph --out $RESULTS"
step $ENCODER --precision fp32 --configs $BASE --batch $THROUGHPUT --name "encoder_${DEVICE%%:*}_fp32_throughput"
step $ENCODER --precision bf16 --configs $SMALL --name "encoder_${DEVICE%%:*}_bf16_small"
step $ENCODER --precision fp32 --configs $SMALL --name "encoder_${DEVICE%%:*}_fp32_small"
ls -l "$RESULTS"
echo "total ${SECONDS}s"
if [ -n "${OUT:-}" ]; then pack && echo "packed $OUT/gpu_results.tar.gz"; fi
