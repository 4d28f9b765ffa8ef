#!/usr/bin/env bash
# One-call GPU check: build with CUDA, run the CUDA tests and then the whole suite, run the
# benchmark suite on the GPU, and leave logs and CSVs in $OUT (or bench/results/gpu).
# Sized to finish in about 6 minutes on an H100/H200 (each stage has its own time limit, so a
# stage that hangs cannot take the later ones with it).
#
# Optional benchmark peers and the cvxpy oracle (qpth, cvxpylayers, higher, cvxpy and its
# solvers) are installed from wheels in .whl/ when that folder exists (for a machine without
# network access: fill it with `pip download` / `pip wheel` elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
PY="${PYTHON:-python3}"
STAGE_TESTS="${STAGE_TESTS:-150}" STAGE_BENCH="${STAGE_BENCH:-170}"

stamp() { echo "[$(date +%T)] $*"; }

{
  stamp env
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'triton', triton.__version__)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastmaml-peers .whl/*.whl && echo "peers installed from .whl"
  fi
} 2>&1 | tee "$OUT_DIR/gpu_env.log"
[ -d /tmp/fastmaml-peers ] && export PYTHONPATH="/tmp/fastmaml-peers${PYTHONPATH:+:$PYTHONPATH}"

{
  stamp "build (CUDA)"
  timeout 300 "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 40
  "$PY" -m fastmaml.info
  stamp "build done"
} 2>&1 | tee "$OUT_DIR/gpu_build.log"

{
  stamp "CUDA tests"
  FASTMAML_REQUIRE_NATIVE=1 timeout "$STAGE_TESTS" "$PY" -m pytest -q -p no:cacheprovider -n 8 -rs \
    tests/test_cuda_consistency.py tests/test_multi_tensor.py tests/test_inner_update.py tests/test_backend.py \
    tests/test_bench.py 2>&1 | tail -n 80
  stamp "whole suite"
  FASTMAML_REQUIRE_NATIVE=1 timeout "$STAGE_TESTS" "$PY" -m pytest -q -p no:cacheprovider -n 12 tests 2>&1 | tail -n 60
  stamp "tests done"
} 2>&1 | tee "$OUT_DIR/gpu_tests.log"

{
  stamp "benchmarks (CUDA)"
  timeout "$STAGE_BENCH" "$PY" -m fastmaml.bench --device cuda --quick --no-plots
  stamp "benchmarks done"
} 2>&1 | tee "$OUT_DIR/gpu_bench.log"
tar czf "$OUT_DIR/gpu_results.tar.gz" bench/results/*.csv 2>/dev/null || true
stamp "gpu check done"
