"""pytest-benchmark suite for ``ecp::score`` and ``ecp::gram`` on CUDA, both backends (skipped without a GPU).

``pytest bench/bench_triton.py --benchmark-only``. Each case times the fused op, cuBLAS on the two
equivalent GEMMs and the unfused PyTorch formula in the input dtype (see ``bench/triton_table.py``).
The benchmark's ``extra_info`` records TFLOP/s with ``4 * N * in * out`` FLOPs per call.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the Triton benchmarks need a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_table import score_flops, unfused_score  # noqa: E402

import ecp_fast  # noqa: E402
import ecp_fast.ops  # noqa: E402

SHAPES = [(16384, 4096, 4096), (16384, 784, 300)]
DTYPES = [torch.bfloat16, torch.float32]


def make_layer(n: int, fan_in: int, fan_out: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """ReLU-like activations, small gradients and weights on the GPU."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, fan_in, device="cuda", generator=generator).relu_().to(dtype)
    g = (torch.randn(n, fan_out, device="cuda", generator=generator) * 1e-2).to(dtype)
    weight = torch.randn(fan_out, fan_in, device="cuda", generator=generator).to(dtype)
    return x, g, weight


def run_timed(benchmark, fn, flops: float) -> None:
    """Benchmark ``fn`` with a device synchronisation per call and record its TFLOP/s."""

    def call() -> None:
        fn()
        torch.cuda.synchronize()

    call()  # compile / autotune / cuBLAS heuristics outside the measurement
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


@pytest.fixture(autouse=True)
def ieee_float32():
    """float32 cases run without TF32, for the kernel and cuBLAS alike."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_score_triton(benchmark, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    x, g, weight = make_layer(*shape, dtype)
    run_timed(benchmark, lambda: ecp_fast.score(x, g, weight), score_flops(*shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_score_cublas_two_gemms(benchmark, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    x, g, _ = make_layer(*shape, dtype)
    c_t = g.float().square().t().to(dtype)
    x_sq = x.square()

    def two_gemms() -> None:
        torch.mm(c_t, x)
        torch.mm(c_t, x_sq)

    run_timed(benchmark, two_gemms, score_flops(*shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_score_torch_formula(benchmark, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    x, g, weight = make_layer(*shape, dtype)
    run_timed(benchmark, lambda: unfused_score(x, g, weight), score_flops(*shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_triton(benchmark, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """ecp::gram with sample weights against the single cuBLAS GEMM of the same shapes below."""
    x, _, _ = make_layer(*shape, dtype)
    sample_weight = torch.rand(x.shape[0], device="cuda", dtype=dtype)
    run_timed(benchmark, lambda: ecp_fast.ops.gram(x, None, sample_weight), 2.0 * x.shape[0] * x.shape[1] ** 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_cublas_one_gemm(benchmark, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    x, _, _ = make_layer(*shape, dtype)
    run_timed(benchmark, lambda: torch.mm(x.T, x), 2.0 * x.shape[0] * x.shape[1] ** 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_score_gemm_backend(benchmark, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """ecp_fast.ops.gemm: the same sums by float32-output cuBLAS GEMMs (the other CUDA backend)."""
    from ecp_fast.ops import gemm

    x, g, weight = make_layer(*shape, dtype)
    run_timed(benchmark, lambda: gemm.score(x, g, weight), score_flops(*shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_gemm_backend(benchmark, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    from ecp_fast.ops import gemm

    x, _, _ = make_layer(*shape, dtype)
    sample_weight = torch.rand(x.shape[0], device="cuda", dtype=dtype)
    run_timed(benchmark, lambda: gemm.gram(x, None, sample_weight), 2.0 * x.shape[0] * x.shape[1] ** 2)
