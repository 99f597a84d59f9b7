"""Selecting the backend of the ops on CUDA tensors (ecp_fast.ops.cuda): registration, routing, errors.

The CUDA dispatch key exists without a GPU, so registration is checked here; the routing functions
registered for it are called directly (with stand-ins for the backends' ops, which need CUDA tensors).
"""

from __future__ import annotations

import sys

import pytest
import torch

import ecp_fast.ops
from ecp_fast.ops import cuda, gemm


@pytest.fixture
def without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment in which ``import ecp_fast.ops.triton`` fails, as without the triton package."""
    monkeypatch.delattr(ecp_fast.ops, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "ecp_fast.ops.triton", None)


def test_each_call_goes_to_the_backend_selected_now(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from ecp_fast.ops import triton as triton_backend

    for module, name in ((gemm, "gemm"), (triton_backend, "triton")):
        monkeypatch.setattr(module, "moments", lambda x, g, name=name: name)
        monkeypatch.setattr(module, "score", lambda x, g, w, compensate, name=name: name)
        monkeypatch.setattr(module, "gram", lambda a, b, w, float64, name=name: name)
    x = torch.ones(2, 3)
    for name in ("gemm", "triton", "gemm"):
        ecp_fast.ops.use_cuda_backend(name)
        assert ecp_fast.ops.cuda_backend() == name
        assert cuda._moments(x, x) == cuda._score(x, x, x, True) == cuda._gram(x, None, None, False) == name
    for op in ("moments", "score", "finalize", "gram"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ecp::{op}", "CUDA"), op


def test_the_registered_cuda_kernels_take_the_schemas_defaults() -> None:
    """Through the dispatcher's CUDA entry (CPU tensors, so no GPU is needed): the dispatcher leaves out
    trailing arguments equal to their defaults, which the registered kernels must supply again."""
    ecp_fast.ops.use_cuda_backend("gemm")
    x, g = torch.randn(50, 7), torch.randn(50, 4)
    weight = torch.randn(4, 7)
    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for compensate in (True, False):
        got = torch.ops.ecp.score.default.redispatch(cuda_key, x, g, weight, compensate)
        for got_t, expected in zip(got, gemm.score(x, g, weight, compensate), strict=True):
            assert torch.equal(got_t, expected)
    assert torch.equal(torch.ops.ecp.gram.default.redispatch(cuda_key, x, None, None, False), gemm.gram(x))
    moments = torch.ops.ecp.moments.default.redispatch(cuda_key, x, g)
    assert all(torch.equal(a, b) for a, b in zip(moments, gemm.moments(x, g), strict=True))


def test_bad_names_and_a_missing_triton_change_nothing(without_triton: None) -> None:
    ecp_fast.ops.use_cuda_backend("gemm")
    with pytest.raises(ValueError, match=r"argument 'name' must be one of \('triton', 'gemm'\), got 'cuda'"):
        ecp_fast.ops.use_cuda_backend("cuda")
    with pytest.raises(ImportError, match="'triton' CUDA backend needs the triton package"):
        ecp_fast.ops.use_cuda_backend("triton")
    assert ecp_fast.ops.cuda_backend() == "gemm"


def test_default_follows_the_environment_and_falls_back_to_gemm(
    monkeypatch: pytest.MonkeyPatch, without_triton: None
) -> None:
    with pytest.warns(RuntimeWarning, match="run on library GEMMs"):
        assert cuda.default_cuda_backend() == "gemm"
    monkeypatch.setenv("ECP_FAST_CUDA_BACKEND", " Triton ")
    assert cuda.default_cuda_backend() == "triton"  # as asked; selecting it then names the missing package
    monkeypatch.setenv("ECP_FAST_CUDA_BACKEND", "")  # unset
    with pytest.warns(RuntimeWarning, match="run on library GEMMs"):
        assert cuda.default_cuda_backend() == "gemm"
    monkeypatch.setenv("ECP_FAST_CUDA_BACKEND", "cublas")
    with pytest.warns(RuntimeWarning) as warned:
        assert cuda.default_cuda_backend() == "gemm"  # the value ignored, then the default without triton
    messages = [str(warning.message) for warning in warned]
    assert "must be one of ('triton', 'gemm'), got 'cublas'; it is ignored" in messages[0]
    assert "run on library GEMMs" in messages[1]


def test_a_triton_that_breaks_on_import_falls_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception from importing the Triton backend (a broken install) selects the GEMM backend."""

    def broken(name: str):
        if name == "triton":
            raise RuntimeError("libcuda.so: cannot open shared object file")
        return gemm

    monkeypatch.setattr(cuda, "_backend_module", broken)
    with pytest.warns(RuntimeWarning, match="libcuda.so"):
        assert cuda.default_cuda_backend() == "gemm"
