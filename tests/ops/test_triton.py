"""The Triton kernels of ``ecp_fast.ops.triton`` against the float64 reference.

Without a GPU the kernels run on CPU tensors through the Triton interpreter. Triton decorates its own
standard library (``tl.sum``, ``tl.cdiv``) when it is imported, so ``TRITON_INTERPRET=1`` must be set
before the first ``import triton`` of the process: this module sets it (when there is no GPU) before
importing anything that imports triton. If triton was imported earlier without it (another module
collected first imported it), the kernel tests run in a fresh interpreter subprocess instead
(``test_kernels_in_interpreter_subprocess``). With a GPU, the same tests run compiled on CUDA tensors
(one fixed configuration; autotuning has its own test), and the tests marked ``cuda`` check the op
dispatch, autotuning and the TF32 switch.

Tolerances (per element, ``|got - ref| <= tol * (|ref| + max |ref|)``, the max over the compared
tensor): float32 inputs 1e-4; float16/bfloat16 inputs 2e-2 (the dots run on bf16 operands).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ecp_fast.ops.triton as ecp_triton  # noqa: E402
from ecp_fast.ops import reference  # noqa: E402
from ecp_fast.ops.triton import kernels  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, in, out): ones, primes and sizes that leave masked tails in every tile dimension.
SHAPES = [(1, 1, 1), (7, 13, 5), (37, 19, 23), (67, 3, 31)]

ON_GPU = torch.cuda.is_available() and not ecp_triton.is_interpreted()
KERNELS_RUN_HERE = ON_GPU or ecp_triton.interpreter_ready()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
kernel_test = pytest.mark.skipif(
    not KERNELS_RUN_HERE,
    reason="triton was imported before TRITON_INTERPRET=1 was set; these run in a subprocess instead",
)


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels as this process runs them: interpreted on CPU, or compiled with one fixed config."""
    if ON_GPU:
        monkeypatch.setenv("ECP_FAST_TRITON_AUTOTUNE", "0")
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch as compiled kernels (no interpreter) with full autotuning."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ECP_FAST_TRITON_AUTOTUNE", "1")
    assert not ecp_triton.is_interpreted()


def assert_matches(got: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """Per-element check scaled by the tensor's magnitude; names the first mismatching index."""
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    got64 = got.detach().cpu().to(torch.float64)
    expected64 = expected.detach().cpu().to(torch.float64)
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    allowed = tol * (expected64.abs() + scale)
    bad = ~((got64 - expected64).abs() <= allowed)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first at {index}: got "
            f"{got64[index].item()!r}, expected {expected64[index].item()!r} (tolerance {tol} x "
            f"(|expected| + {scale:.3g}))"
        )


def make_layer(
    n: int, fan_in: int, fan_out: int, probes: int | None, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations with a non-zero mean (as after a ReLU), gradients ``(N, out)`` or ``(P, N, out)``."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, fan_in, generator=generator) * 2.0 + 3.0).to(dtype)
    g_shape = (n, fan_out) if probes is None else (probes, n, fan_out)
    g = (torch.randn(g_shape, generator=generator) * 0.01).to(dtype)
    weight = torch.randn(fan_out, fan_in, generator=generator).to(dtype)
    return x.to(DEVICE), g.to(DEVICE), weight.to(DEVICE)


def check_moments(x: torch.Tensor, g: torch.Tensor, tol: float) -> None:
    got = ecp_triton.moments(x, g)
    expected = reference.moments(x, g)
    for name, got_t, expected_t in zip(("s0", "mean", "m2"), got, expected, strict=True):
        assert got_t.dtype == expected_t.dtype, f"{name}: dtype {got_t.dtype} != {expected_t.dtype}"
        assert_matches(got_t, expected_t, tol, name)


def check_score(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, compensate: bool, tol: float) -> None:
    got = ecp_triton.score(x, g, weight, compensate)
    expected = reference.score(x, g, weight, compensate)
    for name, got_t, expected_t in zip(("importance", "bias_delta"), got, expected, strict=True):
        assert got_t.dtype == expected_t.dtype, f"{name}: dtype {got_t.dtype} != {expected_t.dtype}"
        assert_matches(got_t, expected_t, tol, name)


# ---- every launcher path against the reference (interpreter on CPU, compiled on a GPU) ----------


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("probes", [None, 1, 3], ids=lambda p: f"P={p}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_moments_and_score_match_reference(
    launch: None, shape: tuple[int, int, int], probes: int | None, dtype: torch.dtype
) -> None:
    x, g, weight = make_layer(*shape, probes, dtype)
    tol = TOLERANCE[dtype]
    check_moments(x, g, tol)
    check_score(x, g, weight, True, tol)
    check_score(x, g, weight, False, tol)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thousand_samples_with_drifting_mean(launch: None, dtype: torch.dtype) -> None:
    """N > 1000: the shift (first 256 samples) differs from the mean of the rest; m2 must not care."""
    x, g, weight = make_layer(1031, 9, 5, 3, dtype, seed=1)
    drift = torch.linspace(0.0, 50.0, 1031, device=DEVICE).unsqueeze(1)
    x = (x.float() + drift).to(dtype)
    tol = TOLERANCE[dtype]
    check_moments(x, g, tol)
    check_score(x, g, weight, True, tol)
    check_score(x, g, weight, False, tol)


@kernel_test
def test_thousand_inputs(launch: None) -> None:
    """in = 1021 (prime): many tiles along the input dimension, a masked tail in the last one."""
    x, g, weight = make_layer(5, 1021, 3, None, torch.float32, seed=2)
    check_score(x, g, weight, True, TOLERANCE[torch.float32])


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_column_is_free_to_remove(launch: None, dtype: torch.dtype) -> None:
    """A column at 1000.0: the bias absorbs it, importance ~0 and bias_delta = w * 1000."""
    x, g, weight = make_layer(45, 7, 6, 3, dtype, seed=3)
    x[:, 4] = 1000.0
    importance, bias_delta = ecp_triton.score(x, g, weight)
    expected_importance, expected_delta = reference.score(x, g, weight)
    tol = TOLERANCE[dtype]
    assert_matches(importance, expected_importance, tol, "importance")
    assert_matches(bias_delta, expected_delta, tol, "bias_delta")
    # Relative to the other columns' importance, the constant column's is rounding only.
    assert importance[:, 4].abs().max() <= 1e-6 * importance.abs().max()
    assert_matches(bias_delta[:, 4], weight[:, 4].double() * 1000.0, TOLERANCE[torch.float32], "bias_delta[:, 4]")


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_gradient_rows_give_zeros(launch: None, dtype: torch.dtype) -> None:
    """Neurons that never affect the output (s0 = 0) get exactly zero mean, m2, importance, delta."""
    x, g, weight = make_layer(29, 11, 7, 3, dtype, seed=4)
    dead = [0, 5]
    g[..., dead] = 0.0
    s0, mean, m2 = ecp_triton.moments(x, g)
    importance, bias_delta = ecp_triton.score(x, g, weight)
    for name, t in (("s0", s0[dead]), ("mean", mean[dead]), ("m2", m2[dead])):
        assert torch.count_nonzero(t) == 0, f"{name} of a dead neuron is not zero: {t}"
    for name, t in (("importance", importance[dead]), ("bias_delta", bias_delta[dead])):
        assert torch.count_nonzero(t) == 0, f"{name} of a dead neuron is not zero: {t}"
    check_moments(x, g, TOLERANCE[dtype])


@kernel_test
def test_all_outputs_are_non_negative(launch: None) -> None:
    """m2 and importance are clamped at zero even where the subtraction rounds below it."""
    x, g, weight = make_layer(40, 6, 4, None, torch.float32, seed=5)
    x[:, 2] = 0.1  # constant: m2 is pure rounding here
    _, _, m2 = ecp_triton.moments(x, g)
    importance, _ = ecp_triton.score(x, g, weight)
    assert bool((m2 >= 0).all()) and bool((importance >= 0).all())


@kernel_test
def test_strided_inputs_and_leading_dims(launch: None) -> None:
    """Transposed, sliced and batched (B, T, in) inputs read through their strides."""
    x, g, weight = make_layer(24, 10, 9, 3, torch.float32, seed=6)
    x_strided = x.t().contiguous().t()  # column-major (N, in)
    g_strided = g.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # out-major (P, N, out)
    weight_strided = weight.t().contiguous().t()
    assert not x_strided.is_contiguous() and not g_strided.is_contiguous()
    tol = TOLERANCE[torch.float32]
    check_moments(x_strided, g_strided, tol)
    check_score(x_strided, g_strided, weight_strided, True, tol)
    wide = torch.randn(24, 20, device=DEVICE)
    check_moments(wide[:, ::2], g, tol)  # stride 2 along the inputs
    batched = x.reshape(4, 6, 10)  # (batch, tokens, in): every token is a sample
    got = ecp_triton.score(batched, g, weight)
    expected = reference.score(x, g, weight)
    assert_matches(got[0], expected[0], tol, "importance")
    assert_matches(got[1], expected[1], tol, "bias_delta")


@kernel_test
def test_many_probes_are_reduced_first(launch: None) -> None:
    """P above the unrolled limit takes the pre-reduced sensitivity path."""
    probes = kernels.MAX_UNROLLED_PROBES + 3
    x, g, weight = make_layer(21, 8, 5, probes, torch.bfloat16, seed=7)
    check_moments(x, g, TOLERANCE[torch.bfloat16])
    check_score(x, g, weight, False, TOLERANCE[torch.bfloat16])


@kernel_test
def test_mixed_dtypes_use_float32_dots(launch: None) -> None:
    """bf16 activations with float32 gradients keep float32 precision (no bf16 operands)."""
    x, g, weight = make_layer(33, 12, 6, 3, torch.bfloat16, seed=8)
    g = torch.randn(g.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    check_moments(x, g, TOLERANCE[torch.float32])
    check_score(x, g, weight.float(), True, TOLERANCE[torch.float32])


@kernel_test
def test_float64_matches_reference_exactly(launch: None) -> None:
    """float64 inputs use the float64 reference path and return float64."""
    x, g, weight = make_layer(17, 5, 4, 3, torch.float64, seed=10)
    check_moments(x, g, TOLERANCE[torch.float64])
    check_score(x, g, weight, True, TOLERANCE[torch.float64])


@kernel_test
def test_empty_sample_set_gives_zeros(launch: None) -> None:
    x = torch.randn(0, 5, device=DEVICE)
    g = torch.randn(2, 0, 3, device=DEVICE)
    s0, mean, m2 = ecp_triton.moments(x, g)
    assert s0.shape == (3,) and mean.shape == (3, 5) and m2.shape == (3, 5)
    assert torch.count_nonzero(s0) + torch.count_nonzero(mean) + torch.count_nonzero(m2) == 0
    importance, bias_delta = ecp_triton.score(x, g, torch.randn(3, 5, device=DEVICE))
    assert torch.count_nonzero(importance) + torch.count_nonzero(bias_delta) == 0


# ---- ecp::gram ------------------------------------------------------------------------------------

# (N, in_a, in_b): ones, primes, tails in every tile dimension, and the ones column alone in a tile.
GRAM_SHAPES = [(1, 1, 1), (7, 13, 5), (37, 19, 23), (67, 15, 31)]
GRAM_VARIANTS = [(False, False), (False, True), (True, False), (True, True)]  # (use b, use weight)


def make_gram_inputs(n: int, in_a: int, in_b: int, dtype: torch.dtype, seed: int = 0):
    """ReLU-like ``a``, centred ``b`` and positive weights with a zero, on the test device."""
    generator = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, in_a, generator=generator) * 2.0 + 3.0).relu().to(dtype)
    b = torch.randn(n, in_b, generator=generator).to(dtype)
    weight = torch.rand(n, generator=generator)
    weight[::5] = 0.0
    return a.to(DEVICE), b.to(DEVICE), weight.to(dtype).to(DEVICE)


def check_gram(a: torch.Tensor, b, weight, tol: float) -> None:
    got = ecp_triton.gram(a, b, weight)
    expected = reference.gram(a, b, weight)
    assert got.dtype == expected.dtype, f"H: dtype {got.dtype} != {expected.dtype}"
    assert got.is_contiguous()
    assert_matches(got, expected, tol, f"H (b={b is not None}, weight={weight is not None})")


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_matches_reference(launch: None, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """Half inputs are exact products with float32 sums: every dtype meets the float32 tolerance."""
    a, b, weight = make_gram_inputs(*shape, dtype)
    for use_b, use_weight in GRAM_VARIANTS:
        check_gram(a, b if use_b else None, weight if use_weight else None, TOLERANCE[torch.float32])


@kernel_test
def test_gram_strides_leading_dims_and_edge_sizes(launch: None) -> None:
    a, b, weight = make_gram_inputs(24, 10, 9, torch.float32, seed=1)
    tol = TOLERANCE[torch.float32]
    check_gram(a.t().contiguous().t(), b.t().contiguous().t(), weight, tol)  # column-major
    check_gram(a.reshape(4, 6, 10), b.reshape(6, 4, 9), None, tol)  # leading dimensions
    check_gram(torch.randn(24, 20, device=DEVICE)[:, ::2], None, torch.rand(48, device=DEVICE)[::2], tol)
    check_gram(a[:, :0], b, weight, tol)  # in_a = 0: only the ones column
    empty = ecp_triton.gram(a[:0], b[:0], weight[:0])
    assert empty.shape == (11, 10) and torch.count_nonzero(empty) == 0
    got64 = ecp_triton.gram(a, b, weight, float64=True)
    assert got64.dtype == torch.float64
    assert_matches(got64, reference.gram(a, b, weight, True), TOLERANCE[torch.float64], "H float64")


# ---- non-finite input ---------------------------------------------------------------------------


@kernel_test
def test_nan_gradients_are_not_dead_neurons(launch: None) -> None:
    """A NaN gradient makes its neuron's statistics NaN, as in the reference, not zero."""
    x, g, weight = make_layer(29, 6, 5, 3, torch.float32, seed=14)
    g[1, 4, 2] = float("nan")
    for got, expected in zip(ecp_triton.moments(x, g), reference.moments(x, g), strict=True):
        assert torch.equal(got.isnan(), expected.isnan())
    for compensate in (True, False):
        importance, _ = ecp_triton.score(x, g, weight, compensate)
        assert bool(importance[2].isnan().all()) and not bool(importance[[0, 1, 3, 4]].isnan().any())


@kernel_test
@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
def test_float32_overflow_gives_the_reference_result(launch: None) -> None:
    """Inputs near 1e20 overflow float32 sums (inf - inf = NaN); the reference is finite there."""
    x, g, weight = make_layer(40, 4, 3, None, torch.float32, seed=15)
    x[:, 1] = 1e20
    g = g * 1e18
    for got, expected in zip(ecp_triton.score(x, g, weight), reference.score(x, g, weight), strict=True):
        assert torch.equal(got.isnan(), expected.isnan()) and not bool(expected.isnan().any())
        assert torch.equal(got.isinf(), expected.isinf())
    a = torch.tensor([[1e20], [1e20]], device=DEVICE)
    b = torch.tensor([[1e20], [-1e20]], device=DEVICE)
    assert torch.equal(ecp_triton.gram(a, b), reference.gram(a, b))


@kernel_test
@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
def test_importance_in_range_is_finite_where_m2_overflows_float32(launch: None) -> None:
    """m2 = 2e40 overflows the kernel's float32 sums; w^2 m2 = 2e36 does not, nor does it in the reference."""
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]], device=DEVICE)
    g = torch.full((2, 1), 1e20, device=DEVICE)
    weight = torch.tensor([[1e-2, 0.0]], device=DEVICE)
    expected = reference.score(x.double(), g.double(), weight.double())[0].float()
    importance, _ = ecp_triton.score(x, g, weight)
    assert torch.equal(importance.cpu(), expected.cpu()), importance  # [[2e36, 0]]


@pytest.mark.parametrize(
    "bad_call",
    [
        lambda: (torch.randn(5, 4), torch.randn(6, 3), None),  # N mismatch
        lambda: (torch.randn(5, 4), torch.randn(2, 2, 5, 3), None),  # g of 4 dims
        lambda: (torch.randn(5, 4), torch.randn(5, 3), torch.randn(4, 3)),  # weight transposed
        lambda: (torch.randn(5, 4).int(), torch.randn(5, 3), None),  # integer x
        lambda: (torch.randn(4), torch.randn(4, 3), None),  # 1-d x
    ],
    ids=["n-mismatch", "g-4d", "weight-shape", "x-int", "x-1d"],
)
def test_errors_match_the_other_backends(launch: None, bad_call) -> None:
    x, g, weight = bad_call()
    weight = weight if weight is not None else torch.randn(g.shape[-1], x.shape[-1])
    with pytest.raises((TypeError, ValueError)) as expected:
        reference.score(x, g, weight)
    with pytest.raises(type(expected.value)) as got:
        ecp_triton.score(x, g, weight)
    assert str(got.value) == str(expected.value)


@kernel_test
def test_direct_launcher_calls_refuse_what_the_ops_refuse(launch: None) -> None:
    """A launcher called directly skips the op's autograd step and the wrapper's argument checks: it
    makes them itself, with the same messages (an input requiring grad; a bool flag given as an int)."""
    import ecp_fast

    x, g, weight = make_layer(4, 3, 2, None, torch.float32)
    tracked = weight.clone().requires_grad_()
    with pytest.raises(RuntimeError) as expected:
        ecp_fast.score(x, g, tracked)
    with pytest.raises(RuntimeError) as got:
        ecp_triton.score(x, g, tracked)
    assert str(got.value) == str(expected.value) and "argument 'weight' requires grad" in str(got.value)
    with pytest.raises(RuntimeError, match="argument 'x' requires grad"):
        ecp_triton.moments(x.clone().requires_grad_(), g)
    with pytest.raises(RuntimeError, match="argument 'a' requires grad"):
        ecp_triton.gram(x.clone().requires_grad_())
    with torch.no_grad():  # the ops take such tensors under no_grad, and so do the launchers
        assert torch.equal(ecp_triton.score(x, g, tracked)[0], ecp_triton.score(x, g, weight)[0])
    with pytest.raises(TypeError, match="ecp.score: argument 'compensate' must be a bool, got int"):
        ecp_triton.score(x, g, weight, 0)
    with pytest.raises(TypeError, match="ecp.gram: argument 'float64' must be a bool, got int"):
        ecp_triton.gram(x, None, None, 1)


def test_cpu_tensors_without_interpreter_are_refused(compiled: None) -> None:
    x, g, weight = (t.cpu() for t in make_layer(4, 3, 2, None, torch.float32))
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ecp_triton.score(x, g, weight)


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_interpreter_subprocess() -> None:
    """Run this module's kernel tests in a fresh process that imports triton under the interpreter."""
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k", "not subprocess"]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-6000:] + finished.stderr[-3000:]
    assert " passed" in finished.stdout, finished.stdout[-3000:]


def test_tile_offsets_that_overflow_int32_are_made_contiguous() -> None:
    """The kernel adds in-tile offsets in int32: a tensor whose tile would reach past 2^31 is copied."""
    from ecp_fast.ops.triton.launch import _int32_offsets

    small = torch.empty_strided((64, 3), (3, 1), device="meta")
    assert _int32_offsets(small, 64, 3) is small
    huge_stride = torch.empty_strided((64, 3), (2**26, 1), device="meta")
    copied = _int32_offsets(huge_stride, 64, 3)
    assert copied.is_contiguous() and copied.shape == huge_stride.shape


def test_register_cuda_kernels_is_idempotent() -> None:
    """Registration works without a GPU (the CUDA dispatch key exists) and can be repeated."""
    ecp_triton.register_cuda_kernels()
    ecp_triton.register_cuda_kernels()
    for name in ("moments", "score", "finalize", "gram"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ecp::{name}", "CUDA"), name


# ---- real GPU -------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("probes", [None, 3], ids=lambda p: f"P={p}")
def test_cuda_ops_dispatch_to_triton(compiled: None, dtype: torch.dtype, probes: int | None) -> None:
    """``torch.ops.ecp.*`` on CUDA tensors runs the (autotuned) kernels and matches the reference."""
    import ecp_fast

    x, g, weight = (t.cuda() for t in make_layer(2053, 383, 257, probes, dtype, seed=11))
    torch.backends.cuda.matmul.allow_tf32 = False
    tol = TOLERANCE[dtype]
    got_moments = ecp_fast.moments(x, g)
    for name, got_t, expected_t in zip(("s0", "mean", "m2"), got_moments, reference.moments(x, g), strict=True):
        assert got_t.is_cuda
        assert_matches(got_t, expected_t, tol, name)
    got_score = ecp_fast.score(x, g, weight)
    for name, got_t, expected_t in zip(
        ("importance", "bias_delta"), got_score, reference.score(x, g, weight), strict=True
    ):
        assert_matches(got_t, expected_t, tol, name)
    importance, bias_delta = ecp_fast.finalize(*got_moments, weight)
    assert_matches(importance, got_score[0], tol, "finalize importance")
    assert_matches(bias_delta, got_score[1], tol, "finalize bias_delta")
    tuned = kernels.build_kernels(False, True).weighted_moments
    assert tuned.cache, "the autotuner recorded no configuration"


@cuda
def test_cuda_tf32_switch(compiled: None) -> None:
    """float32 follows torch.backends.cuda.matmul.allow_tf32: IEEE when off, TF32 (looser) when on."""
    x, g, weight = (t.cuda() for t in make_layer(4096, 256, 128, None, torch.float32, seed=12))
    expected = reference.score(x, g, weight)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = ecp_triton.score(x, g, weight)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = ecp_triton.score(x, g, weight)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert_matches(ieee[0], expected[0], 1e-4, "importance (ieee)")
    assert_matches(tf32[0], expected[0], 1e-2, "importance (tf32)")
    precisions = {key for key in kernels.build_kernels(False, True).weighted_moments.cache for key in key}
    assert {"ieee", "tf32"} <= precisions


@cuda
def test_cuda_opcheck(compiled: None) -> None:
    """The registered CUDA kernels pass torch.library.opcheck (schema, fake kernel, dispatch)."""
    import ecp_fast  # noqa: F401  (registers the kernels)

    x, g, weight = (t.cuda() for t in make_layer(300, 37, 29, 3, torch.bfloat16, seed=13))
    torch.library.opcheck(torch.ops.ecp.moments.default, (x, g))
    torch.library.opcheck(torch.ops.ecp.score.default, (x, g, weight, True))
    torch.library.opcheck(torch.ops.ecp.score.default, (x.t().contiguous().t(), g, weight, False))
    sample_weight = torch.rand(300, device="cuda")
    torch.library.opcheck(torch.ops.ecp.gram.default, (x, None, None, False))
    torch.library.opcheck(torch.ops.ecp.gram.default, (x.t().contiguous().t(), g[0], sample_weight, False))


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_gram_dispatches_to_triton(compiled: None, dtype: torch.dtype) -> None:
    """``torch.ops.ecp.gram`` on CUDA tensors runs the (autotuned) kernel and matches the reference."""
    import ecp_fast.ops

    torch.backends.cuda.matmul.allow_tf32 = False
    a, b, weight = (t.cuda() for t in make_gram_inputs(4099, 383, 257, dtype, seed=16))
    for use_b, use_weight in GRAM_VARIANTS:
        args = (a, b if use_b else None, weight if use_weight else None)
        got = ecp_fast.ops.gram(*args)
        assert got.is_cuda
        assert_matches(got, reference.gram(*args), TOLERANCE[torch.float32], f"H {use_b} {use_weight}")
    assert kernels.build_kernels(False, True).gram.cache, "the autotuner recorded no configuration"
