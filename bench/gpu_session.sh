#!/usr/bin/env bash
# Every GPU check of the project in one call, for a machine with a CUDA GPU and a Python that has
# torch and triton (no network, nothing installed): build the native CPU kernels in place, run the
# tests that need CUDA, then what `make bench-gpu` runs (the ops against cuBLAS, bench/triton_table.py; the
# 2:4 export against dense layers, bench/two_four_gpu.py). Each step has its own time limit, so one
# that hangs does not take the others with it; each step's log goes to $OUT/<step>.log (default
# ./gpu_out) and its end is printed. Figures from it go to docs/gpu.md. All steps together take
# over ten minutes (Triton compiles), so they come in two parts, what matters most first.
#
#   bash bench/gpu_session.sh            # build, CUDA tests, bf16 table, 2:4 (limits: 540 s in all)
#   bash bench/gpu_session.sh more       # then, in a second call: the pruner's CUDA tests on the GEMM
#                                        # backend, the whole Triton suite, the float32 table (540 s)
# PY=python3 and OUT=gpu_out by default. Each call fits one 10-minute device run.
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import ecp_fast from this checkout

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, print its end
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s (limit $limit s)"
    tail -n "${TAIL:-15}" "$OUT/$name.log"
}

XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")

if [ "${1:-main}" = more ]; then
    # The whole Triton suite compiled on the GPU (a kernel variant per case: over 150 s with 8 workers
    # on an H200), then float32 without the largest shape (without TF32 it autotunes on CUDA cores:
    # over 100 s for the first shape).
    # The pruner's CUDA tests again with the ops on the GEMM backend (ecp_fast.ops.gemm).
    # shellcheck disable=SC2086
    TAIL=15 step tests-cuda-gemm 60 env ECP_FAST_CUDA_BACKEND=gemm "$PY" -m pytest -q -p no:cacheprovider -rf $XDIST \
        tests/pruning/test_cuda.py
    # shellcheck disable=SC2086
    TAIL=25 step tests-triton 280 env ECP_FAST_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -rf $XDIST \
        tests/ops/test_triton.py
    TAIL=9 step table-fp32 200 "$PY" bench/triton_table.py --dtypes fp32 --shapes 16384,4096,4096 16384,784,300
    exit 0
fi

step env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'"
TAIL=3 step build 60 env MAX_JOBS=16 "$PY" setup.py build_ext --inplace
step import 20 "$PY" -c "import ecp_fast.ops as ops, torch; print('native CPU:', ops.NATIVE_CPU, 'CUDA kernels:', torch.ops.ecp.score.default.has_kernel_for_dispatch_key('CUDA'))"
# The tests that need CUDA, with one fixed Triton configuration (autotuning has its own test).
CUDA_TESTS="tests/pruning/test_cuda.py tests/ops/test_gemm.py tests/export/test_semi_structured.py tests/export/test_export.py::test_two_four_on_gpu"
CUDA_CASES="cuda or gram or two_four or agrees or availab or layer_ops or chunks or contract or low_part or conv or sequential or neuron or example_inputs"
# shellcheck disable=SC2086
TAIL=25 step tests-cuda 120 env ECP_FAST_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -rf $XDIST \
    $CUDA_TESTS tests/ops/test_triton.py -k "$CUDA_CASES"
# What `make bench-gpu` runs (float32 in the second part).
TAIL=12 step table-bf16 200 "$PY" bench/triton_table.py --dtypes bf16
TAIL=30 step two-four 120 "$PY" bench/two_four_gpu.py
