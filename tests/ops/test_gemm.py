"""The GEMM backend (ecp_fast.ops.gemm) against the float64 reference, on CPU (and on CUDA where present).

On CPU its half-precision products are upcast instead of going through cuBLAS's ``out_dtype`` GEMM;
everything else (chunks, shift, bf16 rounding of the operands, epilogue, hi/lo split) is the code a GPU
runs. Tolerances as for the Triton kernels, per element scaled by the tensor's largest magnitude.
"""

from __future__ import annotations

import pytest
import torch

from ecp_fast.ops import gemm, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# (N, in, out): ones, primes and tails; P in {None, 1, 3}.
SHAPES = [(1, 1, 1), (7, 13, 5), (37, 19, 23), (300, 3, 31)]


def assert_matches(got: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == torch.float32 and got.is_contiguous(), name
    got64, expected64 = got.double().cpu(), expected.double().cpu()
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    bad = ~((got64 - expected64).abs() <= tol * (expected64.abs() + scale))
    assert not bool(bad.any()), f"{name}: {got64[bad][:3].tolist()} != {expected64[bad][:3].tolist()}"


def layer(n: int, fan_in: int, fan_out: int, probes: int | None, dtype: torch.dtype, device: str, seed: int = 0):
    """Inputs with a large mean next to their spread (the shift matters), small gradients, weights."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, fan_in, generator=generator) * 2.0 + 30.0
    g = torch.randn((n, fan_out) if probes is None else (probes, n, fan_out), generator=generator) * 0.01
    weight = torch.randn(fan_out, fan_in, generator=generator)
    return x.to(device, dtype), g.to(device, dtype), weight.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("probes", [None, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_ops_match_reference(shape, probes, dtype: torch.dtype, device: str) -> None:
    x, g, weight = layer(*shape, probes, dtype, device)
    tol = TOLERANCE[dtype]
    for name, got, expected in zip(("s0", "mean", "m2"), gemm.moments(x, g), reference.moments(x, g), strict=True):
        assert_matches(got, expected, tol, name)
    for compensate in (True, False):
        got = gemm.score(x, g, weight, compensate)
        expected = reference.score(x, g, weight, compensate)
        assert_matches(got[0], expected[0], tol, f"importance (compensate={compensate})")
        assert_matches(got[1], expected[1], tol, f"bias_delta (compensate={compensate})")


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_strides_dead_rows_and_leading_dimensions(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Many chunks give the one-chunk sums; strided and batched inputs; a row with no sensitivity is 0."""
    x, g, weight = layer(1000, 40, 12, 2, torch.float32, device, seed=1)
    g[:, :, 3] = 0.0  # neuron 3 never sensitive: mean, m2, importance and bias shift exactly 0
    whole = gemm.score(x, g, weight)
    monkeypatch.setattr(gemm, "CHUNK_BYTES", 4 * 1024)  # a few samples per chunk
    chunked = gemm.score(x, g, weight)
    for got, expected in zip(chunked, reference.score(x, g, weight), strict=True):
        assert_matches(got, expected, 1e-4, "chunked score")
    for got, one_chunk in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, one_chunk, rtol=1e-5, atol=1e-6 * float(one_chunk.abs().max()))
    assert bool((chunked[0][3] == 0).all()) and bool((chunked[1][3] == 0).all())
    strided = x.t().contiguous().t()
    assert_matches(gemm.moments(strided, g)[2], reference.moments(x, g)[2], 1e-4, "column-major x")
    batched = x.reshape(10, 100, 40)
    assert_matches(gemm.moments(batched, g)[2], reference.moments(x, g)[2], 1e-4, "leading dims")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_gram_matches_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, device: str) -> None:
    """Every variant (b or not, weights or not) at the float32 tolerance: half products are exact, and
    weighted bf16 goes through the hi/lo split; over several chunks."""
    monkeypatch.setattr(gemm, "CHUNK_BYTES", 8 * 1024)
    generator = torch.Generator().manual_seed(2)
    a = ((torch.randn(301, 37, generator=generator) * 2.0 + 3.0).relu()).to(device, dtype)
    b = torch.randn(301, 11, generator=generator).to(device, dtype)
    weight = torch.rand(301, generator=generator).to(device, dtype)
    weight[::7] = 0.0
    for use_b in (False, True):
        for use_weight in (False, True):
            args = (a, b if use_b else None, weight if use_weight else None)
            assert_matches(gemm.gram(*args), reference.gram(*args), 1e-4, f"H (b={use_b}, weight={use_weight})")
    assert gemm.gram(a, b, weight, float64=True).dtype == torch.float64


def test_bf16_weighted_gram_keeps_the_low_part() -> None:
    """Without the lo half of the split, weighted bf16 sums would be off by about 2^-9: the test above sees it."""
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(500, 8, generator=generator).bfloat16()
    weight = torch.rand(500, generator=generator) * 3.0 + 0.1
    exact = reference.gram(a.double(), None, weight.double())
    rounded_once = reference.gram((a.float() * weight.unsqueeze(1)).bfloat16().double(), a.double())
    got = gemm.gram(a, None, weight)
    assert float((got.double() - exact).norm() / exact.norm()) < 1e-6
    assert float((rounded_once - exact).norm() / exact.norm()) > 1e-4


def test_contract_edges_are_the_ops() -> None:
    """Empty layers, float64 (the reference), a non-finite float32 result (the float64 rescue), errors."""
    x, g, weight = layer(20, 6, 4, None, torch.float32, "cpu")
    before = (x.clone(), g.clone(), weight.clone())
    gemm.moments(x, g), gemm.score(x, g, weight), gemm.score(x, g, weight, False), gemm.gram(x, g, g[:, 0].abs())
    assert all(torch.equal(t, saved) for t, saved in zip((x, g, weight), before, strict=True)), "an input changed"
    assert gemm.moments(x[:0], g[:0])[0].tolist() == [0.0] * 4
    assert torch.equal(gemm.moments(x[:, :0], g)[0], g.square().sum(0))
    for got, expected in zip(gemm.score(x.double(), g, weight), reference.score(x.double(), g, weight), strict=True):
        assert got.dtype == torch.float64 and torch.equal(got, expected)
    huge = x * 1e19  # float32 squares overflow; the float64 reference's do not
    assert bool(torch.isfinite(gemm.score(huge, g, weight)[0]).all())
    with pytest.raises(ValueError, match="ecp.score"):
        gemm.score(x, g, weight[:, :5])
    with pytest.raises(TypeError, match="ecp.gram: argument 'float64' must be a bool"):
        gemm.gram(x, None, None, 1)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="requires grad"):
        gemm.moments(x.clone().requires_grad_(), g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_ops_on_cuda_run_the_selected_backend() -> None:
    """With ``use_cuda_backend("gemm")`` the registered ops on CUDA tensors give exactly ``gemm``'s results."""
    from ecp_fast.ops import cuda_backend, use_cuda_backend

    x, g, weight = layer(3000, 70, 30, 2, torch.bfloat16, "cuda")
    previous = cuda_backend()
    try:
        use_cuda_backend("gemm")
        for got, expected in zip(torch.ops.ecp.score(x, g, weight, True), gemm.score(x, g, weight), strict=True):
            assert torch.equal(got, expected)
        assert torch.equal(torch.ops.ecp.gram(x, None, None, False), gemm.gram(x))
    finally:
        use_cuda_backend(previous or "triton")


def test_a_torch_without_the_out_dtype_gemm_falls_back_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``torch.mm(..., out_dtype=)`` fails (an older torch; here: no CPU kernel), the product is
    taken in float32 instead, the same numbers, and the failing call is not tried again."""
    monkeypatch.setattr(gemm, "_out_dtype_works", None)
    monkeypatch.setattr(gemm, "_use_out_dtype", lambda a: gemm._out_dtype_works is not False)
    calls = []
    real_mm = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append("out_dtype" in kwargs)
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", counting_mm)
    x, g, weight = layer(40, 9, 5, None, torch.bfloat16, "cpu")
    for got, expected in zip(gemm.score(x, g, weight), reference.score(x, g, weight), strict=True):
        assert_matches(got, expected, TOLERANCE[torch.bfloat16], "score")
    assert gemm._out_dtype_works is False and calls.count(True) == 1
