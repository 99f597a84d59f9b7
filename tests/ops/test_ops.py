"""The ecp ops (native CPU kernel) against the float64 reference, op checks and bad input."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ecp_fast
from ecp_fast import ops
from ecp_fast.ops import reference

# (N, in, out, P): 1, primes, odd tails around the kernel's chunk and padding sizes, N = 1, P > 1.
SHAPES = [
    (1, 1, 1, 1),
    (1, 7, 3, 2),
    (2, 1, 5, 1),
    (13, 17, 11, 3),
    (64, 31, 1, 1),
    (257, 16, 33, 2),
    (1023, 97, 61, 1),
    (1500, 5, 7, 4),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make_inputs(n: int, fan_in: int, fan_out: int, probes: int, dtype: torch.dtype, seed: int = 0):
    """Inputs with a non-zero mean (like ReLU outputs) and gradients with a few dead neurons."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, fan_in, generator=generator) * 1.5 + 2.0).to(dtype)
    g = torch.randn(probes, n, fan_out, generator=generator)
    g[:, :, ::5] *= 0.1
    g = (g if probes > 1 else g[0]).to(dtype)
    weight = torch.randn(fan_out, fan_in, generator=generator).to(dtype)
    return x, g, weight


def assert_close_to_reference(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str, scale: torch.Tensor | None = None
) -> None:
    """Relative to the tensor's scale, which is what ranking weights needs; reports the worst index."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = (expected.abs().max() if scale is None else scale).clamp_min(1e-30)
    error = (actual.double() - expected.double()).abs()
    worst = int(error.argmax()) if error.numel() else 0
    if error.numel():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
        assert error.max() <= rtol * scale, (
            f"{name}: max error {error.max():.3g} > {rtol} * scale {scale:.3g} at index {index}: "
            f"actual {actual[index]:.8g}, expected {expected[index]:.8g}"
        )


def tolerance(dtype: torch.dtype) -> float:
    # Inputs of every dtype are read exactly and accumulated in float32 (float64 for float64), so
    # half inputs are held to the float32 tolerance too.
    return 1e-10 if dtype == torch.float64 else 2e-5


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-in{}-out{}-P{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moments_matches_reference(shape, dtype):
    x, g, _ = make_inputs(*shape, dtype=dtype)
    actual = ecp_fast.moments(x, g)
    expected = reference.moments(x, g)
    for name, a, e in zip(("s0", "mean", "m2"), actual, expected, strict=True):
        assert_close_to_reference(a, e, tolerance(dtype), name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-in{}-out{}-P{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compensate", [True, False], ids=["ecp", "uncompensated"])
def test_score_matches_reference(shape, dtype, compensate):
    x, g, weight = make_inputs(*shape, dtype=dtype)
    importance, bias_delta = ecp_fast.score(x, g, weight, compensate=compensate)
    expected_importance, expected_delta = reference.score(x, g, weight, compensate=compensate)
    assert_close_to_reference(importance, expected_importance, tolerance(dtype), "importance")
    assert_close_to_reference(bias_delta, expected_delta, tolerance(dtype), "bias_delta")
    if not compensate:
        assert torch.count_nonzero(bias_delta) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finalize_matches_reference(dtype):
    x, g, weight = make_inputs(41, 23, 19, 2, dtype=torch.float64)
    s0, mean, m2 = reference.moments(x, g)
    s0[3] = 0.0  # a dead neuron: docs/method.md says zero importance and zero shift
    args = [t.to(dtype) for t in (s0, mean, m2, weight)]
    actual = ecp_fast.finalize(*args)
    expected = reference.finalize(*args)
    for name, a, e in zip(("importance", "bias_delta"), actual, expected, strict=True):
        assert_close_to_reference(a, e, tolerance(dtype), name)
    assert actual[0][3].abs().max() == 0 and actual[1][3].abs().max() == 0


def test_score_equals_finalize_of_moments():
    x, g, weight = make_inputs(300, 29, 13, 3, dtype=torch.float32)
    fused = ecp_fast.score(x, g, weight)
    staged = ecp_fast.finalize(*ecp_fast.moments(x, g), weight)
    for a, b in zip(fused, staged, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def permuted(t: torch.Tensor) -> torch.Tensor:
    """Same values, reversed memory layout (column-major for a matrix)."""
    return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))


@pytest.mark.parametrize("layout", ["permuted", "sliced", "expanded", "leading_dims"], ids=str)
def test_any_strides_and_leading_dimensions(layout):
    x, g, weight = make_inputs(60, 21, 9, 3, dtype=torch.float32, seed=3)
    if layout == "permuted":
        x, g, weight = permuted(x), permuted(g), permuted(weight)
        assert not x.is_contiguous() and not g.is_contiguous()
    elif layout == "sliced":
        big_x = torch.randn(120, 50)
        big_x[::2, 3:24] = x
        x = big_x[::2, 3:24]
        g = torch.randn(3, 60, 30)[:, :, ::3][:, :, :9].copy_(g)
    elif layout == "expanded":
        x = x[:1].expand(60, 21)  # stride 0 along samples: every sample is the same input
    elif layout == "leading_dims":
        x = x.reshape(4, 15, 21).transpose(0, 1)  # (tokens, batch, in), not viewable as (N, in)
        g = g.reshape(3, 4, 15, 9).transpose(1, 2).reshape(3, 60, 9)
    expected = reference.score(x, g, weight)
    actual = ecp_fast.score(x, g, weight)
    # Identical samples have zero spread: the natural scale is then the uncompensated importance.
    scale = reference.score(x, g, weight, compensate=False)[0].abs().max()
    for name, a, e in zip(("importance", "bias_delta"), actual, expected, strict=True):
        assert_close_to_reference(a, e, 2e-5, name, scale=scale if layout == "expanded" else None)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    fan_in=st.integers(1, 40),
    fan_out=st.integers(1, 40),
    probes=st.integers(1, 4),
    mean=st.floats(-50, 50),
    compensate=st.booleans(),
)
def test_score_property_matches_reference(n, fan_in, fan_out, probes, mean, compensate):
    x, g, weight = make_inputs(n, fan_in, fan_out, probes, torch.float64)
    x = x + mean
    actual = ecp_fast.score(x, g, weight, compensate=compensate)
    expected = reference.score(x, g, weight, compensate=compensate)
    for name, a, e in zip(("importance", "bias_delta"), actual, expected, strict=True):
        assert_close_to_reference(a, e, 1e-9, name)
    assert (actual[0] >= 0).all()


def test_empty_calibration_gives_zeros():
    x, g, weight = torch.empty(0, 4), torch.empty(0, 3), torch.randn(3, 4)
    s0, mean, m2 = ecp_fast.moments(x, g)
    assert s0.shape == (3,) and mean.shape == (3, 4)
    assert s0.abs().sum() == 0 and mean.abs().sum() == 0 and m2.abs().sum() == 0
    importance, bias_delta = ecp_fast.score(x, g, weight)
    assert importance.abs().sum() == 0 and bias_delta.abs().sum() == 0


# ---- numerics (docs/method.md) -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_constant_column_is_free_to_remove(dtype):
    """A column constant at 1000 is fully absorbed by the bias: I ~ 0 and delta* = w * 1000."""
    x, g, weight = make_inputs(4096, 64, 32, 2, dtype=torch.float32, seed=7)
    x[:, 5] = 1000.0
    x, g, weight = x.to(dtype), g.to(dtype), weight.to(dtype)
    importance, bias_delta = ecp_fast.score(x, g, weight)
    typical = importance.median()
    assert importance[:, 5].max() < 1e-6 * typical
    expected_delta = weight[:, 5].float() * 1000.0
    torch.testing.assert_close(bias_delta[:, 5], expected_delta, rtol=1e-5, atol=0)


def test_large_mean_small_spread_keeps_precision():
    """Raw sums would lose every digit here (mean 1e4, spread 1e-2) in float32; shifted ones do not."""
    generator = torch.Generator().manual_seed(11)
    x64 = 1e4 + 1e-2 * torch.randn(5000, 8, generator=generator, dtype=torch.float64)
    g64 = torch.randn(5000, 6, generator=generator, dtype=torch.float64)
    _, _, m2 = ecp_fast.moments(x64.float(), g64.float())
    _, _, expected = reference.moments(x64.float(), g64.float())
    torch.testing.assert_close(m2.double(), expected.double(), rtol=1e-2, atol=0)


def test_dead_neuron_row_is_zero():
    x, g, weight = make_inputs(200, 10, 6, 3, dtype=torch.float32)
    g[:, :, 4] = 0.0
    importance, bias_delta = ecp_fast.score(x, g, weight)
    s0, mean, m2 = ecp_fast.moments(x, g)
    assert s0[4] == 0
    for t in (importance[4], bias_delta[4], mean[4], m2[4]):
        assert t.abs().max() == 0
    assert importance[:4].abs().max() > 0


def test_importance_is_compensated_error():
    """I_ij = min over delta of sum_s c (delta - w a)^2, and the minimiser is delta*."""
    x, g, weight = make_inputs(80, 5, 4, 2, dtype=torch.float64, seed=5)
    importance, bias_delta = ecp_fast.score(x, g, weight)
    c = g.square().sum(0)  # (N, out)
    for i, j in itertools.product(range(4), range(5)):
        removed = weight[i, j] * x[:, j]

        def error(delta: float) -> float:
            return float((c[:, i] * (delta - removed).square()).sum())

        best = float(bias_delta[i, j])
        assert error(best) == pytest.approx(float(importance[i, j]), rel=1e-9, abs=1e-12)
        for step in (1e-3, -1e-3):
            assert error(best + step) >= error(best)


def test_merge_of_halves_equals_one_pass():
    x, g, _ = make_inputs(1001, 37, 19, 3, dtype=torch.float32, seed=2)
    x = x + 100.0
    whole = ecp_fast.moments(x, g)
    first = ecp_fast.moments(x[:400], g[:, :400])
    second = ecp_fast.moments(x[400:], g[:, 400:])
    merged = ecp_fast.merge_moments(first, second)
    expected = reference.moments(x, g)
    for name, m, w, e in zip(("s0", "mean", "m2"), merged, whole, expected, strict=True):
        assert_close_to_reference(m, e, 2e-5, f"merged {name}")
        assert_close_to_reference(m, w, 2e-5, f"merged vs one pass {name}")


# ---- op registration: opcheck, FakeTensor, torch.compile ----------------------------------------


def sample_inputs():
    """(op, args) pairs covering every op, contiguous and permuted, float32 and mixed dtypes."""
    samples = []
    for layout in ("contiguous", "permuted"):
        x, g, weight = make_inputs(37, 11, 7, 2, dtype=torch.float32)
        if layout == "permuted":
            x, g, weight = permuted(x), permuted(g), permuted(weight)
        samples.append((torch.ops.ecp.moments.default, (x, g)))
        samples.append((torch.ops.ecp.score.default, (x, g, weight, True)))
        samples.append((torch.ops.ecp.score.default, (x, g[0], weight, False)))
        moments = reference.moments(x, g)
        samples.append((torch.ops.ecp.finalize.default, (*moments, weight)))
    x, g, weight = make_inputs(9, 4, 3, 1, dtype=torch.bfloat16)
    samples.append((torch.ops.ecp.score.default, (x, g.double(), weight, True)))
    return samples


@pytest.mark.skipif(os.environ.get("ECP_FAST_DISABLE_NATIVE") == "1", reason="ECP_FAST_DISABLE_NATIVE=1")
def test_native_kernel_is_loaded():
    assert ops.NATIVE_CPU, "the C++ CPU kernels were not built or failed to load"


@pytest.mark.parametrize("op, args", sample_inputs(), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_fake_tensor_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 5, 6, dtype=torch.bfloat16)
        g = torch.empty(3, 40, 4, dtype=torch.float64)
        weight = torch.empty(4, 6)
        importance, bias_delta = torch.ops.ecp.score(x, g, weight)
        s0, mean, m2 = torch.ops.ecp.moments(x, g)
    assert importance.shape == (4, 6) and importance.dtype == torch.float64
    assert s0.shape == (4,) and mean.shape == (4, 6) and m2.dtype == torch.float64


def test_torch_compile_fullgraph():
    def importance_and_new_bias(x, g, weight, bias):
        importance, bias_delta = torch.ops.ecp.score(x, g, weight)
        return importance.sqrt(), bias + bias_delta.sum(dim=1)

    x, g, weight = make_inputs(50, 12, 6, 2, dtype=torch.float32)
    bias = torch.randn(6)
    compiled = torch.compile(importance_and_new_bias, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, g, weight, bias), importance_and_new_bias(x, g, weight, bias), strict=True):
        torch.testing.assert_close(a, b)


# ---- bad input: the message names the argument, the expected and the actual value -----------------

BACKENDS = {"native": ecp_fast.score, "reference": reference.score}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "x_shape, g_shape, w_shape, pattern",
    [
        ((5,), (5, 3), (3, 5), r"argument 'x' must have at least 2 dimensions .*got shape \(5,\)"),
        ((10, 4), (10,), (3, 4), r"argument 'g' must have shape \(N, out\) or \(P, N, out\), got shape \(10,\)"),
        ((10, 4), (2, 2, 10, 3), (3, 4), r"argument 'g' .*got shape \(2, 2, 10, 3\)"),
        ((10, 4), (9, 3), (3, 4), r"argument 'g' must have N = 10 samples .*got shape \(9, 3\)"),
        ((10, 4), (2, 11, 3), (3, 4), r"argument 'g' must have N = 10 .*got shape \(2, 11, 3\)"),
        ((10, 4), (10, 3), (3, 5), r"argument 'weight' must have shape \(out, in\) = \(3, 4\).*got shape \(3, 5\)"),
        ((10, 4), (10, 3), (2, 4), r"argument 'weight' .*= \(3, 4\).*got shape \(2, 4\)"),
        ((10, 4), (10, 3), (3, 4, 1), r"argument 'weight' .*got shape \(3, 4, 1\)"),
    ],
)
def test_bad_shapes_are_named(backend, x_shape, g_shape, w_shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        BACKENDS[backend](torch.randn(x_shape), torch.randn(g_shape), torch.randn(w_shape))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("argument", ["x", "g", "weight"])
def test_integer_dtype_is_named(backend, argument):
    tensors = {"x": torch.randn(6, 4), "g": torch.randn(6, 3), "weight": torch.randn(3, 4)}
    tensors[argument] = tensors[argument].to(torch.int64)
    with pytest.raises(TypeError, match=rf"argument '{argument}' must have dtype float32.*got torch.int64"):
        BACKENDS[backend](**tensors)


def test_moments_bad_input_named():
    with pytest.raises(TypeError, match=r"argument 'g' must have dtype .*got torch.int32"):
        ecp_fast.moments(torch.randn(4, 2), torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"argument 'g' must have N = 4"):
        ecp_fast.moments(torch.randn(4, 2), torch.randn(5, 3))


@pytest.mark.parametrize("argument", ["s0", "mean", "m2"])
def test_finalize_bad_shapes_named(argument):
    tensors = {"s0": torch.rand(3), "mean": torch.randn(3, 4), "m2": torch.rand(3, 4)}
    tensors[argument] = tensors[argument][:2]
    with pytest.raises(ValueError, match=rf"argument '{argument}' must have shape .*got shape \(2"):
        ecp_fast.finalize(weight=torch.randn(3, 4), **tensors)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_tensors_on_different_devices_are_named(backend):
    x, g, weight = make_inputs(6, 4, 3, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"argument 'g' must be on the same device as 'x' \(cpu\), got meta"):
        BACKENDS[backend](x, g.to("meta"), weight)
