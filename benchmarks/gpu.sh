#!/usr/bin/env bash
# The GPU benchmark set in one prepared run (< 8 minutes on an H100/H200), results under $OUT.
#
# On a lent GPU machine (no network; its own Python with torch): put the wheels it lacks in .gpu_wheels/
# (hiera-transformer for the official baseline, tqdm), ignored by git, and carry that folder:
#     pip download --no-deps -d .gpu_wheels hiera-transformer==0.1.4 tqdm
#     run: bash benchmarks/gpu.sh          (carry: .gpu_wheels)
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
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
$PY - <<'PY' >"$OUT/gpu_env.txt" 2>&1 || true
import subprocess, torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
PY

if [ "$DRY" = 1 ]; then
  BASE=hiera_tiny_8x64; REPEATS=2; SECONDS_ENGINE=2; BIG=4
else
  BASE=hiera_base_16x224; REPEATS=20; SECONDS_ENGINE=15; BIG=32
fi
step() { echo "== $*"; timeout 300 "$@" || echo "!! failed: $*"; }
# encoder latency and throughput, ours vs official eager, same weights; then ours under torch.compile
step $PY -m benchmarks encoder --device "$DEVICE" --precision bf16 --configs $BASE --batch 1 $BIG \
  --repeats $REPEATS --compile --out "$OUT"
step $PY -m benchmarks encoder --device "$DEVICE" --precision fp32 --configs $BASE --batch 1 \
  --repeats $REPEATS --out "$OUT"
# MAE training step, mask ratio 0.9
step $PY -m benchmarks mae_step --device "$DEVICE" --precision bf16 --configs $BASE --batch 8 \
  --repeats $((REPEATS / 2 > 1 ? REPEATS / 2 : 2)) --out "$OUT"
# engine: 640x480 uint8 frames at 30 fps in, labels out
step $PY -m benchmarks engine --model $BASE --device "$DEVICE" --precision bf16 --seconds $SECONDS_ENGINE --out "$OUT"
ls -l "$OUT"
