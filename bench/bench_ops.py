"""pytest-benchmark suite for the ecp ops on CPU: fused kernels vs the reference vs torch.mm.

``score``/``moments`` are compared with the two ``torch.mm`` of their shapes; ``gram`` with the single
``torch.mm(a.T, b)`` of its shapes (``bench/gram_report.py`` prints the ratios as a table).

Run: ``make bench`` or ``.venv/bin/python -m pytest bench/bench_ops.py --benchmark-only``.
Compare rows of one group (one shape) with each other; absolute times depend on the machine.
"""

from __future__ import annotations

import pytest
import torch
from ops_cases import CPU_CASES, GRAM_CASES, make_gram_inputs, make_layer_inputs, one_matmul, two_matmuls

import ecp_fast
from ecp_fast import ops
from ecp_fast.ops import reference


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


@pytest.mark.parametrize("case", GRAM_CASES, ids=lambda c: c.id)
def bench_gram_native(benchmark, case):
    a, b, weight = make_gram_inputs(case)
    benchmark.group = f"gram-{case.id}"
    benchmark(ops.gram, a, b, weight)


@pytest.mark.parametrize("case", GRAM_CASES, ids=lambda c: c.id)
def bench_gram_one_matmul(benchmark, case):
    a, b, _ = make_gram_inputs(case)
    benchmark.group = f"gram-{case.id}"
    benchmark(one_matmul, a, b)


def test_gram_benchmark_inputs_agree():
    """The benchmarked Gram is the reference's (cheap; runs with the benchmarks)."""
    for case in GRAM_CASES:
        a, b, weight = make_gram_inputs(case._replace(n=64, fan_in=33))
        expected = reference.gram(a, b, weight)
        torch.testing.assert_close(ops.gram(a, b, weight), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_benchmark_inputs_agree():
    """The benchmarked calls compute the same thing (a cheap guard that runs with the benchmarks)."""
    x, g, weight = make_layer_inputs(CPU_CASES[0]._replace(n=64))
    for a, b in zip(ecp_fast.score(x, g, weight), reference.score(x, g, weight), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
