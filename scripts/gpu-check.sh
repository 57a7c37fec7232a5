#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU, in one command, from the repository root after the README's setup:
#   bash scripts/gpu-check.sh
# Runs the GPU tests (`pytest -m gpu`: precision per device, every method training in auto / fp16 / fp32, fused
# attention, the benchmark and the tiny DAG on the GPU), the benchmark at the default preset on the GPU, and the
# benchmark at paper scale (preset imagenet: ViT-B/16 at 224 px, every method, bf16 or fp16 as `auto` picks
# plus fp32, each row's step breakdown and the attention kernels) at batch $VIT_BATCH per GPU (default 64) eager
# and torch.compile'd, with the largest per-GPU batch that fits per method; then prints one PASS/FAIL line per
# check. Everything lands in results/bench/gpu/: summary.txt, the logs, bench.json/bench.md/modes_loss.png,
# imagenet/ and imagenet-compile/ (bench.json, bench.md), nvidia-smi.txt and environment.txt. The ViT-B tables
# give img/s per GPU, comparable with the papers' GPU-hours. Exit status 0 only if every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=results/bench/gpu
mkdir -p "$OUT"
: > "$OUT/summary.txt"
failed=0

check() {   # check NAME COMMAND...: run it, log to $OUT/NAME.log, record PASS/FAIL with its wall time
  local name=$1 start=$SECONDS status=PASS
  shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1 || { status=FAIL; failed=1; }
  echo "$status $name ($((SECONDS - start)) s, log $OUT/$name.log)" | tee -a "$OUT/summary.txt"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "(nvidia-smi not found)" > "$OUT/nvidia-smi.txt"
check cuda "$PY" -c "
import torch
from pipeline import hardware
assert torch.cuda.is_available(), 'torch sees no CUDA device'
p = hardware.resolve('auto', 'cuda')
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, precision auto -> {p.name}: {p.reason}')
"
cp "$OUT/cuda.log" "$OUT/environment.txt"
if grep -q "^FAIL cuda" "$OUT/summary.txt"; then
  echo "FAIL: no usable CUDA device; see $OUT/cuda.log"
  exit 1
fi
check gpu-tests "$PY" -m pytest -m gpu -n 0 -p no:cacheprovider tests/test_gpu.py
check bench "$PY" -m pipeline.bench.throughput --preset default --device cuda --out "$OUT"
VIT_BATCH=${VIT_BATCH:-64}
check bench-vitb "$PY" -m pipeline.bench.throughput --preset imagenet --device cuda --batch-size "$VIT_BATCH" \
  --steps 10 --max-batch --out "$OUT/imagenet"
check bench-vitb-compile "$PY" -m pipeline.bench.throughput --preset imagenet --device cuda --batch-size "$VIT_BATCH" \
  --steps 10 --compile --out "$OUT/imagenet-compile"
echo
cat "$OUT/summary.txt"
[ $failed = 0 ] && echo "all GPU checks passed" || echo "some GPU checks FAILED"
exit $failed
