"""pytest-benchmark: ECP pruning of LeNet-300-100 against computing its Jacobian rows alone.

Workload: a 784-300-100-10 ReLU MLP (random weights), 2,000 random calibration samples in batches of
500, exact Jacobian rows of the 10 outputs for every layer. ``jacobian_rows`` is the floor any
output-sensitivity pruner pays (one forward pass per batch and one batched backward pass of 10 rows);
``ecp_prune`` is the whole ``Pruner.calibrate`` + ``Pruner.prune(0.9)`` (moments, scores, global
selection, compensation, masks). ``jacobian_rows_and_moments`` adds to the rows the one thing ECP must
compute from them, the fused ``ecp.moments`` of every layer (two ``(out, N) x (N, in)`` products per
layer and batch): the floor of any ECP implementation, nothing else included. Targets: ``ecp_prune``
at most 3x ``jacobian_rows`` (release 0.1) and at most 1.5x (release 0.2).

Run: ``.venv/bin/python -m pytest bench/bench_pruner.py --benchmark-only
--benchmark-columns=min,median,mean,rounds -s``; the ratio of the medians is printed at the end
(``ECP_BENCH_THREADS`` sets the torch thread count, default 1).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from functools import partial

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast

SAMPLES = 2_000
BATCH = 500
SIZES = (784, 300, 100, 10)
_MEDIANS: dict[str, float] = {}
logger = logging.getLogger(__name__)


def lenet_300_100(seed: int = 0) -> nn.Sequential:
    """784-300-100-10 with ReLU, default (Kaiming-uniform) initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def calibration_batches(seed: int = 0) -> list[torch.Tensor]:
    """2,000 random inputs (uniform in [0, 1), like pixel intensities) in batches of 500."""
    generator = torch.Generator().manual_seed(seed)
    return list(torch.rand(SAMPLES, SIZES[0], generator=generator).split(BATCH))


def _keep_output(outputs: list[torch.Tensor], module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    outputs.append(output)


def _keep_input(inputs: list[torch.Tensor], module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    inputs.append(args[0])


def jacobian_rows(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Exact rows ``dy_k/dz`` of every Linear for every batch: forward hooks + one batched backward."""
    layers = [module for module in model.modules() if isinstance(module, nn.Linear)]
    rows = []
    for inputs in batches:
        outputs: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(partial(_keep_output, outputs)) for layer in layers]
        try:
            y = model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        basis = torch.eye(y.shape[1]).unsqueeze(1).expand(y.shape[1], *y.shape)
        rows.append(torch.autograd.grad(y, outputs, grad_outputs=basis, is_grads_batched=True))
    return rows


def jacobian_rows_and_moments(model: nn.Module, batches: list[torch.Tensor]) -> list[list[ecp_fast.Moments]]:
    """The rows of :func:`jacobian_rows`, then every layer's ``ecp.moments`` from its inputs and rows."""
    layers = [module for module in model.modules() if isinstance(module, nn.Linear)]
    result = []
    for inputs in batches:
        captured: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(partial(_keep_input, captured)) for layer in layers]
        try:
            (rows,) = jacobian_rows(model, [inputs])
        finally:
            for handle in handles:
                handle.remove()
        result.append([ecp_fast.moments(x.detach(), g) for x, g in zip(captured, rows, strict=True)])
    return result


def ecp_prune(model: nn.Module, batches: list[torch.Tensor]) -> ecp_fast.PruneReport:
    """Calibrate with exact Jacobian rows and prune 90% globally with ECP."""
    pruner = ecp_fast.Pruner(model, sensitivity="output", progress=False)
    pruner.calibrate(batches)
    return pruner.prune(0.9, method="ecp", scope="global")


@pytest.fixture(scope="module")
def workload():
    # Both sides run with the same thread count; one thread by default because on a shared 2-core
    # machine OpenMP spin-waits on busy cores dominate and make multi-threaded timings erratic.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ECP_BENCH_THREADS", "1")))
    yield lenet_300_100(), calibration_batches()
    torch.set_num_threads(threads)


def bench_jacobian_rows(benchmark, workload):
    model, batches = workload
    benchmark.group = "lenet300-ecp"
    rows = benchmark.pedantic(jacobian_rows, args=(model, batches), rounds=7, iterations=1, warmup_rounds=1)
    assert rows[0][0].shape == (10, BATCH, 300)
    _MEDIANS["jacobian_rows"] = benchmark.stats.stats.median


def bench_jacobian_rows_and_moments(benchmark, workload):
    model, batches = workload
    benchmark.group = "lenet300-ecp"
    moments = benchmark.pedantic(
        jacobian_rows_and_moments, args=(model, batches), rounds=7, iterations=1, warmup_rounds=1
    )
    assert moments[0][0].mean.shape == (300, 784)
    _MEDIANS["jacobian_rows_and_moments"] = benchmark.stats.stats.median


def bench_ecp_prune(benchmark, workload):
    model, batches = workload
    benchmark.group = "lenet300-ecp"
    benchmark.extra_info["native_cpu_kernels"] = bool(ecp_fast.ops.NATIVE_CPU)

    def fresh_copy():
        return (copy.deepcopy(model), batches), {}

    report = benchmark.pedantic(ecp_prune, setup=fresh_copy, rounds=7, iterations=1, warmup_rounds=1)
    assert report.sparsity == pytest.approx(0.9, abs=1e-4)
    _MEDIANS["ecp_prune"] = benchmark.stats.stats.median
    if "jacobian_rows" in _MEDIANS:
        ratio = _MEDIANS["ecp_prune"] / _MEDIANS["jacobian_rows"]
        benchmark.extra_info["ratio_to_jacobian_rows"] = ratio
        floor = _MEDIANS.get("jacobian_rows_and_moments", float("nan")) / _MEDIANS["jacobian_rows"]
        print(
            f"\nLeNet-300-100, {SAMPLES} samples: jacobian rows {_MEDIANS['jacobian_rows'] * 1e3:.1f} ms, "
            f"ECP prune {_MEDIANS['ecp_prune'] * 1e3:.1f} ms (medians), ratio {ratio:.2f} (target <= 1.5; "
            f"rows + moments alone {floor:.2f}), native CPU kernels: {ecp_fast.ops.NATIVE_CPU}, "
            f"threads: {torch.get_num_threads()}"
        )
