#!/usr/bin/env bash
# One-call GPU check: build with CUDA, run the test suite (CUDA and Triton backends included),
# run the benchmark suite on the GPU, and leave logs and CSVs in $OUT (or bench/results).
# Sized to finish in about 8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT_DIR/gpu_env.log"

echo "== build (CUDA) =="
"$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 30 | tee "$OUT_DIR/gpu_build.log"
"$PY" -m fastmaml.info 2>&1 | tee -a "$OUT_DIR/gpu_build.log"

echo "== tests =="
timeout 240 "$PY" -m pytest -q -x tests -p no:cacheprovider 2>&1 | tail -n 60 | tee "$OUT_DIR/gpu_tests.log"

echo "== benchmarks =="
timeout 300 "$PY" -m fastmaml.bench --device cuda --quick 2>&1 | tee "$OUT_DIR/gpu_bench.log"
cp bench/results/*.csv "$OUT_DIR/" 2>/dev/null || true
mkdir -p "$OUT_DIR/figures" && cp bench/results/figures/*.png "$OUT_DIR/figures/" 2>/dev/null || true
echo "gpu check done"
