#!/usr/bin/env bash
# One-call GPU check: build with CUDA, run the CUDA tests, then the GPU benchmarks (heads at the
# full level with qpth, the meta-gradient workloads with every batching, the inner update), and
# leave logs and CSVs in $OUT (or bench/results/gpu). Sized to finish in about 7 minutes on an
# H100/H200: every stage has its own time limit, so a stage that hangs cannot take the later ones
# with it. `bash bench/gpu_check.sh full` also runs the whole test suite.
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
  # A compiled op's own input check crashed a test worker on an H100 machine (torch 2.11) where it
  # must raise RuntimeError: run that call alone first, with faulthandler, to keep its traceback.
  stamp "probe: exception from a compiled op's input check"
  timeout 60 "$PY" -X faulthandler -c "import torch, fastmaml
try:
    torch.ops.fastmaml.task_axpby([torch.randn(3, 4)], [torch.randn(3, 4)], [torch.ones(3)], None, None)
except RuntimeError as e:
    print('raised RuntimeError as it should:', str(e).splitlines()[0])" 2>&1 | tail -n 40
  stamp "CUDA tests"
  # xdist workers share 16 cores: one or two threads each, or the CPU-side tests thrash.
  OMP_NUM_THREADS=2 FASTMAML_REQUIRE_NATIVE=1 timeout "${STAGE_TESTS:-90}" "$PY" -m pytest -q -p no:cacheprovider \
    -n 8 -rfE tests/test_cuda_consistency.py tests/test_svm_triton.py tests/test_multi_tensor.py \
    tests/test_inner_update.py tests/test_backend.py tests/test_bench.py tests/test_task_matmul.py \
    tests/test_buffer_cache.py tests/test_max_pool.py tests/test_relu_bitmask.py tests/test_batch_norm.py tests/test_conv_fixed_input.py tests/test_cpu_kernels.py tests/test_random_layers.py 2>&1 | grep -v "^SKIPPED" | tail -n 120
  if [ "${1:-}" = "full" ]; then
    stamp "whole suite"
    OMP_NUM_THREADS=1 FASTMAML_REQUIRE_NATIVE=1 timeout 300 "$PY" -m pytest -q -p no:cacheprovider -n 14 -rfE \
      tests 2>&1 | grep -v "^SKIPPED" | tail -n 60
  fi
  stamp "tests done"
} 2>&1 | tee "$OUT_DIR/gpu_tests.log"

{
  stamp "heads (full level: 1/5/15-shot, d = 1600 and 16000, T = 8 and 256, qpth maxIter 3 and 15)"
  timeout "${STAGE_HEADS:-100}" "$PY" -m fastmaml.bench.heads --device cuda --full --no-memory
  stamp "meta A, B (standard level: K = 1, 5 / 5), every batching"
  timeout "${STAGE_META:-110}" "$PY" -m fastmaml.bench.meta --device cuda --no-memory --workload A --workload B \
    --providers loop_autograd func_vmap higher fastmaml_exact fastmaml_vmap fastmaml_stacked fastmaml_fd64
  stamp "meta C (T = 25, 1000) and HVP costs"
  timeout 40 "$PY" -m fastmaml.bench.meta --device cuda --no-memory --workload C --workload hvp \
    --providers func_vmap fastmaml_exact fastmaml_vmap fastmaml_fd64
  stamp "inner update"
  timeout 25 "$PY" -m fastmaml.bench.inner_update --device cuda --quick
  stamp "meta B memory"
  timeout "${STAGE_MEMORY:-90}" "$PY" -m fastmaml.bench.meta --device cuda --workload B --providers func_vmap \
    fastmaml_exact
  stamp "benchmarks done"
} 2>&1 | tee "$OUT_DIR/gpu_bench.log"
tar czf "$OUT_DIR/gpu_results.tar.gz" bench/results/*.csv 2>/dev/null || true
stamp "gpu check done"
