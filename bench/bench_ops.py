"""pytest-benchmark suite for the ecp ops on CPU: fused kernel vs the reference vs two torch.mm.

Run: ``make bench`` or ``.venv/bin/python -m pytest bench/bench_ops.py --benchmark-only``.
Compare rows of one group (one shape) with each other; absolute times depend on the machine.
"""

from __future__ import annotations

import pytest
import torch

import ecp_fast
from ecp_fast.ops import reference

from ops_cases import CPU_CASES, make_layer_inputs, two_matmuls


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def bench_score_native(benchmark, case):
    x, g, weight = make_layer_inputs(case)
    benchmark.group = case.id
    benchmark.extra_info["gemm_gflops"] = case.gemm_flops / 1e9
    benchmark(ecp_fast.score, x, g, weight)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def bench_two_matmuls(benchmark, case):
    x, g, _ = make_layer_inputs(case)
    benchmark.group = case.id
    benchmark(two_matmuls, x, g)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def bench_score_reference(benchmark, case):
    x, g, weight = make_layer_inputs(case)
    benchmark.group = case.id
    benchmark.pedantic(reference.score, args=(x, g, weight), rounds=3, iterations=1)


@pytest.mark.parametrize("case", CPU_CASES[:1], ids=lambda c: c.id)
def bench_moments_native(benchmark, case):
    x, g, _ = make_layer_inputs(case)
    benchmark.group = case.id
    benchmark(ecp_fast.moments, x, g)


def test_benchmark_inputs_agree():
    """The benchmarked calls compute the same thing (a cheap guard that runs with the benchmarks)."""
    x, g, weight = make_layer_inputs(CPU_CASES[0]._replace(n=64))
    for a, b in zip(ecp_fast.score(x, g, weight), reference.score(x, g, weight)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
