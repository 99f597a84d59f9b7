"""pytest-benchmark suite: inference of pruned models exported dense and as CSR.

Run: ``.venv/bin/python -m pytest bench/bench_export.py --benchmark-only``. One group per case
(LeNet-300-100 at 90% / 95% at batch 1 and 256; a 4096x4096 Linear at 95%, batch 16); compare the
rows of a group. ``bench/export_report.py`` prints the interleaved ratios quoted in the README.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from export_report import lenet
from torch import nn

import ecp_fast
from ecp_fast.export import export, exported_layers

#: One thread by default: on a shared machine a second OpenMP thread that loses its core stalls the
#: GEMM at every barrier. Override with ECP_BENCH_THREADS.
THREADS = int(os.environ.get("ECP_BENCH_THREADS", "1"))

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lenets() -> dict[float, nn.Module]:
    return {sparsity: lenet(sparsity) for sparsity in (0.9, 0.95)}


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("sparsity", [0.9, 0.95], ids=["sparse90", "sparse95"])
def bench_lenet(benchmark, lenets, sparsity, batch, fmt):
    model = export(lenets[sparsity], fmt)
    x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"lenet-300-100-{sparsity:.0%}-batch{batch}"
    benchmark.extra_info["layers"] = "/".join(exported_layers(model).values())

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    benchmark(run)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def bench_linear_4096(benchmark, fmt):
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(4096, 4096))
    ecp_fast.prune(layer, None, sparsity=0.95, method="magnitude", scope="layer", progress=False)
    model = export(layer, fmt)
    x = torch.randn(16, 4096)
    benchmark.group = "linear-4096x4096-95%-batch16"

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    benchmark(run)


def test_benchmarked_exports_compute_the_masked_function(lenets):
    """The CSR export is the masked model (a cheap guard that runs with the benchmarks)."""
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(1))
    for model in lenets.values():
        with torch.no_grad():
            torch.testing.assert_close(export(model, "csr")(x), model(x), rtol=1e-5, atol=1e-5)
