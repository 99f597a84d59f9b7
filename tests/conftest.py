"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread, restoring the count afterwards.

    The pruner tests push tiny tensors through many small ops; on a shared 2-core machine, OpenMP
    threads spin-waiting for each other make them several times slower than one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_cuda_backend() -> Iterator[None]:
    """Restore the backend of the ops on CUDA tensors after each test (some tests select one)."""
    from ecp_fast.ops import cuda

    selected = cuda.cuda_backend()
    yield
    cuda._selected = selected
