#!/usr/bin/env bash
# Every GPU check of the project in one call, for a machine with a CUDA GPU and a Python that has
# torch and triton (no network, nothing installed): build the native CPU kernels in place, run the
# tests that need CUDA, then what `make bench-gpu` runs (the ops against cuBLAS, bench/triton_table.py; the
# 2:4 export against dense layers, bench/two_four_gpu.py). Each step has its own time limit, so one
# that hangs does not take the others with it; each step's log goes to $OUT/<step>.log (default
# ./gpu_out) and its end is printed. Figures from it go to docs/gpu.md. All steps together can take
# over ten minutes (Triton compiles); the order puts what matters most first.
#
#   bash bench/gpu_session.sh            # PY=python3 OUT=gpu_out by default
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

step env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'"
TAIL=3 step build 80 env MAX_JOBS=16 "$PY" setup.py build_ext --inplace
step import 20 "$PY" -c "import ecp_fast.ops as ops, torch; print('native CPU:', ops.NATIVE_CPU, 'CUDA kernels:', torch.ops.ecp.score.default.has_kernel_for_dispatch_key('CUDA'))"
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
# The tests that need CUDA first, with one fixed Triton configuration (autotuning has its own test),
# then the benchmarks, and late the whole Triton suite compiled on the GPU: it compiles a kernel
# variant per case and took over 150 s with 8 workers on an H200 (docs/gpu.md). On that machine the
# steps before tests-triton took about 4 minutes, a fresh machine's start 1 to 2 more.
CUDA_TESTS="tests/pruning/test_cuda.py tests/ops/test_gemm.py tests/export/test_semi_structured.py tests/export/test_export.py::test_two_four_on_gpu"
# shellcheck disable=SC2086
TAIL=25 step tests-cuda 100 env ECP_FAST_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -rf $XDIST \
    $CUDA_TESTS tests/ops/test_triton.py -k "cuda or gram or two_four or agrees or availab or layer_ops or chunks or contract or low_part or conv or sequential or neuron or example_inputs"
# What `make bench-gpu` runs, in steps with their own limits; float32 without the largest shape, after
# the whole Triton suite (float32 without TF32 autotunes on CUDA cores: over 100 s for the first shape).
TAIL=12 step table-bf16 150 "$PY" bench/triton_table.py --dtypes bf16
TAIL=30 step two-four 60 "$PY" bench/two_four_gpu.py
# shellcheck disable=SC2086
TAIL=25 step tests-triton 240 env ECP_FAST_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -rf $XDIST \
    tests/ops/test_triton.py
TAIL=9 step table-fp32 180 "$PY" bench/triton_table.py --dtypes fp32 --shapes 16384,4096,4096 16384,784,300
