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


@pytest.mark.skipif(not semi_structured_available(), reason="needs a GPU that runs semi-structured sparse weights")
def test_cuda_export_matches_dense() -> None:
    model = two_four_model(dtype=torch.float16).cuda().eval()
    x = torch.randn(64, 64, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        expected = model(x)
        export_semi_structured(model)
        assert type(model[0].weight.data).__name__.startswith("SparseSemiStructuredTensor")
        torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not semi_structured_available(), reason="needs a GPU that runs semi-structured sparse weights")
def test_cuda_export_with_example_inputs_times_real_layers() -> None:
    """On a GPU the timed choice runs end to end; whichever layers win, the export computes the dense result."""
    from ecp_fast.export import export, exported_layers

    model = two_four_branches().cuda().half().eval()
    for tokens in (8, 8192):
        x = torch.randn(tokens, 64, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            exported = export(model, "2:4", example_inputs=x)
            assert set(exported_layers(exported).values()) <= {"2:4", "dense"}
            torch.testing.assert_close(exported(x), model(x), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not semi_structured_available(), reason="needs a GPU that runs semi-structured sparse weights")
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


class TwoBranches(nn.Module):
    """Two 2:4 layers that run on the example inputs, and one that never does."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.unused = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def two_four_branches() -> TwoBranches:
    model = TwoBranches()
    Pruner(model, include_output_head=True, progress=False).prune(sparsity=0.5, method="magnitude", scope="2:4")
    return model


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A GPU as far as the choice is concerned: availability, a conversion that keeps the dense weight,
    timings by layer width (``up`` 2x faster as 2:4, ``down`` 5% faster), and the export's layer list."""
    from ecp_fast.export import formats, semi_structured

    seen: dict[str, object] = {"timed": []}

    def fake_times(first: nn.Module, second, inputs: torch.Tensor, rounds: int) -> tuple[float, float]:
        seen["timed"].append((first.out_features, tuple(inputs.shape)))  # type: ignore[union-attr]
        return (1.0, 0.5) if first.out_features == 128 else (1.0, 0.95)

    def fake_export(model: nn.Module, layers=None, pattern: str = "2:4") -> nn.Module:
        seen["converted"] = list(layers)
        return model

    monkeypatch.setattr(formats, "semi_structured_available", lambda device=None: True)
    monkeypatch.setattr(
        semi_structured, "_semi_structured_weights", lambda linears: {n: m.weight for n, m in linears.items()}
    )
    monkeypatch.setattr(semi_structured, "time_forms", fake_times)
    monkeypatch.setattr(formats, "export_semi_structured", fake_export)
    return seen


def test_example_inputs_keep_the_slower_layers_dense(fake_gpu: dict[str, object]) -> None:
    """Only layers clearly faster as 2:4 on their real inputs are converted; one that never ran is too."""
    from ecp_fast.export import export

    export(two_four_branches().half(), "2:4", example_inputs=torch.randn(16, 64).half())
    assert fake_gpu["converted"] == ["up", "unused"]
    assert sorted(fake_gpu["timed"]) == [(64, (16, 128)), (128, (16, 64))]  # type: ignore[type-var]
    export(two_four_branches().half(), "2:4")
    assert fake_gpu["converted"] == ["up", "down", "unused"]  # without example_inputs: every 2:4 layer


def test_example_inputs_that_win_nowhere_leave_the_export_dense(
    fake_gpu: dict[str, object], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ecp_fast.export import export, semi_structured

    monkeypatch.setattr(semi_structured, "time_forms", lambda first, second, inputs, rounds: (1.0, 1.0))
    model = nn.Sequential(nn.Linear(64, 64)).half()
    Pruner(model, include_output_head=True, progress=False).prune(sparsity=0.5, method="magnitude", scope="2:4")
    with caplog.at_level(logging.WARNING):
        exported = export(model, "2:4", example_inputs=torch.randn(4, 64).half())
    assert "converted" not in fake_gpu and "stays dense" in caplog.text
    assert torch.equal(exported[0].weight, model[0].weight)
    with pytest.raises(ValueError, match=r"argument 'example_inputs'.*shape \(4, 30\)"):
        export(model, "2:4", example_inputs=torch.randn(4, 30).half())


def test_example_inputs_refuse_a_wrong_dtype_before_timing(fake_gpu: dict[str, object]) -> None:
    """A float32 model is refused naming its first layer, before any layer is timed."""
    from ecp_fast.export import export, semi_structured

    model = two_four_branches()
    with pytest.raises(ValueError, match="layer 'up': semi-structured sparse weights must be float16"):
        semi_structured.choose_two_four_layers(model, {"up": model.up, "down": model.down}, torch.randn(2, 64))
    assert fake_gpu["timed"] == []
    with pytest.raises(ValueError, match="layer 'up'"):
        export(model, "2:4", example_inputs=torch.randn(2, 64))
