"""pytest-benchmark suite: inference of the 784-300-100-10 MLP, dense vs with hidden neurons removed.

Run: ``.venv/bin/python -m pytest bench/bench_structured.py --benchmark-only``. One group per batch
size; compare the rows of a group. ``bench/structured_report.py`` prints the interleaved speed-up
ratios quoted in docs/structured.md.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch
from structured_report import make_mnist_mlp, shrunk_copy

from ecp_fast.pruning.structured import mask_neurons, prune_neurons

RATIOS = (0.0, 0.25, 0.5, 0.75)


#: One thread by default: on a shared machine a second OpenMP thread that loses its core stalls the
#: GEMM at every barrier and the medians become meaningless. Override with ECP_BENCH_THREADS.
THREADS = int(os.environ.get("ECP_BENCH_THREADS", "1"))


@pytest.fixture(scope="module")
def dense() -> Iterator[torch.nn.Module]:
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield make_mnist_mlp().eval()
    torch.set_num_threads(previous)


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"removed{int(r * 100)}")
def bench_mlp_inference(benchmark, dense, ratio, batch):
    model = shrunk_copy(dense, ratio).eval()
    x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"mlp-784-300-100-10-batch{batch}"
    benchmark.extra_info["parameters"] = sum(p.numel() for p in model.parameters())

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    benchmark(run)


def test_benchmarked_models_compute_the_masked_function(dense):
    """The shrunken model is the masked full one (a cheap guard that runs with the benchmarks)."""
    report = prune_neurons(dense, 0.5, method="norm", scope="layer", inplace=False)
    masked = copy.deepcopy(dense)
    mask_neurons(masked, report.plan)
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(report.model(x), masked(x), rtol=1e-5, atol=1e-5)
