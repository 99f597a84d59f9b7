"""Tests of the 2:4 export: pattern validation everywhere, the CPU no-op path, the CUDA path where present."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from ecp_fast import Pruner
from ecp_fast.export.semi_structured import (
    NMPattern,
    NMPatternError,
    check_n_m,
    export_semi_structured,
    parse_pattern,
    semi_structured_available,
)


def two_four_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype)
    x = torch.randn(128, 64, dtype=dtype)
    pruner = Pruner(model, progress=False)
    pruner.calibrate([x])
    pruner.prune(method="ecp", scope="2:4")
    return model


def test_parse_pattern() -> None:
    assert parse_pattern("2:4") == NMPattern(2, 4)
    for bad in ("2-4", "4:2", "0:4", "a:b", 24):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)  # type: ignore[arg-type]


def test_check_accepts_two_four() -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    check_n_m(weight, "2:4")
    check_n_m(torch.zeros(3, 8), "2:4")


def test_check_names_first_violation() -> None:
    weight = torch.zeros(4, 8)
    weight[2, 4:7] = 1.0  # three nonzeros in the second group of row 2
    with pytest.raises(NMPatternError, match=r"layer 'fc' is not 2:4 sparse: row 2, inputs 4\.\.7 hold 3 nonzeros"):
        check_n_m(weight, "2:4", "fc")
    with pytest.raises(NMPatternError, match="multiple of 4"):
        check_n_m(torch.zeros(2, 6), "2:4", "odd")


def test_dense_model_rejected_and_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NMPatternError, match="layer '0' is not 2:4 sparse"):
        export_semi_structured(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_only_two_four_and_linear_names() -> None:
    model = two_four_model()
    with pytest.raises(ValueError, match="only '2:4'"):
        export_semi_structured(model, pattern="1:4")
    with pytest.raises(ValueError, match="must name an nn.Linear"):
        export_semi_structured(model, layers=["1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path runs only without CUDA")
def test_cpu_returns_model_unchanged_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = two_four_model()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(5, 64)
    expected = model(x)
    assert not semi_structured_available()
    with caplog.at_level(logging.WARNING, logger="ecp_fast.export.semi_structured"):
        result = export_semi_structured(model)
    assert result is model
    assert "not faster" in caplog.text or "no faster" in caplog.text
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.skipif(not semi_structured_available(), reason="needs CUDA with compute capability 8.0+")
def test_cuda_export_matches_dense() -> None:
    model = two_four_model(dtype=torch.float16).cuda().eval()
    x = torch.randn(64, 64, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        expected = model(x)
        export_semi_structured(model)
        assert type(model[0].weight.data).__name__.startswith("SparseSemiStructuredTensor")
        torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not semi_structured_available(), reason="needs CUDA with compute capability 8.0+")
def test_cuda_export_rejects_float32() -> None:
    model = two_four_model().cuda()
    with pytest.raises(ValueError, match="float16, bfloat16 or int8"):
        export_semi_structured(model)


@pytest.mark.parametrize(
    ("capability", "cusparselt", "force_cutlass", "expected"),
    [
        ((7, 5), True, False, False),  # no sparse tensor cores
        ((8, 0), False, False, True),  # Ampere: CUTLASS runs
        ((8, 9), False, True, True),
        ((9, 0), True, False, True),  # Hopper: cuSPARSELt only
        ((9, 0), False, False, False),
        ((9, 0), True, True, False),  # CUTLASS forced: its kernels refuse sm_90 at the first forward
        ((10, 0), True, False, True),
    ],
)
def test_availability_follows_the_backends_gpus(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], cusparselt: bool, force_cutlass: bool, expected: bool
) -> None:
    """CUTLASS's 2:4 kernels run on compute capability 8.x only; later GPUs need cuSPARSELt."""

    class Backend:
        @staticmethod
        def is_available() -> bool:
            return cusparselt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends, "cusparselt", Backend, raising=False)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", force_cutlass)
    assert semi_structured_available("cuda:0") is expected
