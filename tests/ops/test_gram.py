"""ecp::gram (the native CPU kernel, or the reference when it is not built) against the float64 reference.

H = sum_s w_s [a_s; 1] [b_s; 1]^T: every dtype, the odd shapes of the moments tests, any strides and
leading dimensions, with and without b and weight; streaming merges; opcheck, torch.compile, errors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecp_fast import ops
from ecp_fast.ops import reference

# (N, in_a, in_b): ones, primes, 1023, and N past the kernel's chunk (8192 rows for narrow inputs).
SHAPES = [
    (1, 1, 1),
    (1, 7, 3),
    (2, 1, 5),
    (13, 17, 11),
    (64, 31, 1),
    (257, 16, 33),
    (1023, 97, 61),
    (3, 1023, 2),
    (8209, 5, 3),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (use b, use weight)
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]


def make_inputs(n: int, in_a: int, in_b: int, dtype: torch.dtype, seed: int = 0):
    """ReLU-like ``a`` with a non-zero mean, a centred ``b`` and positive weights with a few zeros."""
    generator = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, in_a, generator=generator) * 1.5 + 2.0).relu().to(dtype)
    b = torch.randn(n, in_b, generator=generator).to(dtype)
    weight = torch.rand(n, generator=generator)
    weight[::7] = 0.0
    return a, b, weight.to(dtype)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "H") -> None:
    """Within ``rtol`` of the largest entry (what a solve with H needs); names the worst index."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.is_contiguous(), f"{name}: not contiguous"
    if actual.numel() == 0:
        return
    scale = expected.abs().max().double().clamp_min(1e-30)
    error = (actual.double() - expected.double()).abs()
    index = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    assert error.max() <= rtol * scale, (
        f"{name}: max error {error.max():.3g} > {rtol} * scale {scale:.3g} at index {index}: "
        f"actual {actual[index]:.8g}, expected {expected[index]:.8g}"
    )


def tolerance(dtype: torch.dtype) -> float:
    # Half inputs are read exactly and accumulated in float32, like float32 inputs.
    return 1e-12 if dtype == torch.float64 else 2e-5


def check(a, b=None, weight=None, rtol: float = 2e-5, float64: bool = False) -> torch.Tensor:
    actual = ops.gram(a, b, weight, float64=float64)
    expected = reference.gram(a, b, weight, float64)
    assert_matches(actual, expected, rtol)
    return actual


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-a{}-b{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype):
    a, b, weight = make_inputs(*shape, dtype=dtype)
    for use_b, use_weight in VARIANTS:
        actual = check(a, b if use_b else None, weight if use_weight else None, tolerance(dtype))
        in_b = shape[2] if use_b else shape[1]
        assert actual.shape == (shape[1] + 1, in_b + 1)
        assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_flag_accumulates_in_float64(dtype):
    a, b, weight = make_inputs(3001, 23, 9, dtype=dtype, seed=1)
    a = a + 1000.0  # large entries: float32 sums would round at the 1e-7 level, float64 ones do not
    for use_b, use_weight in VARIANTS:
        result = check(a, b if use_b else None, weight if use_weight else None, 1e-12, float64=True)
        assert result.dtype == torch.float64


def test_b_none_is_the_symmetric_special_case():
    a, _, weight = make_inputs(700, 600, 1, torch.float32, seed=2)  # 600 columns: several block rows
    symmetric = ops.gram(a, None, weight)
    assert torch.equal(symmetric, symmetric.T)
    assert_matches(symmetric, ops.gram(a, a, weight), 2e-5)
    assert_matches(symmetric, reference.gram(a, None, weight), 2e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count(threads):
    """Private sums per thread (N >= 256 per thread) and one shared H with a parallel fill (fewer samples)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (400, 1500):
            a, b, weight = make_inputs(n, 300, 40, torch.float32, seed=n)
            for use_b, use_weight in VARIANTS:
                check(a, b if use_b else None, weight if use_weight else None)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 3])
def test_the_same_inputs_give_the_same_bits_on_every_call(threads):
    """A fixed schedule: the column sums of a parallel fill (one shared H) and the private sums of
    the workers (many samples) are added in the same order whichever thread runs which part."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(3)
        for n, fan_in, float64 in ((256, 784, True), (4096, 300, True), (3000, 64, False)):
            a = torch.relu(torch.randn(n, fan_in, generator=generator))
            weight = torch.rand(n, generator=generator)
            for b in (None, a[:, :40]):
                first = ops.gram(a, b, weight, float64=float64)
                for _ in range(12):
                    assert torch.equal(ops.gram(a, b, weight, float64=float64), first), (n, fan_in, b is None)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_result_is_the_kernels_own_sums_closed_up_in_place(threads):
    """H is returned in the buffer it was summed in (its padded rows closed up, no copy): contiguous,
    writable, and holding at most H and one row padding per row, for any number of workers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for in_a, in_b, use_b in ((37, 37, False), (300, 41, True), (5, 1, True)):
            a, b, weight = make_inputs(1000, in_a, in_b, torch.float64, seed=in_a)
            h = ops.gram(a, b if use_b else None, weight)
            rows, columns = in_a + 1, (in_b if use_b else in_a) + 1
            assert h.shape == (rows, columns) and h.is_contiguous() and h.storage_offset() == 0
            assert h.untyped_storage().nbytes() <= rows * (columns + 64) * h.element_size()
            torch.testing.assert_close(h, reference.gram(a, b if use_b else None, weight), rtol=1e-12, atol=1e-9)
            h.add_(1.0)  # the caller's to change, as layer_grams does
    finally:
        torch.set_num_threads(previous)


def test_augmented_entries():
    """The last row and column hold the weighted column sums, the corner the total weight."""
    a, b, weight = make_inputs(50, 4, 3, torch.float64, seed=3)
    h = ops.gram(a, b, weight)
    torch.testing.assert_close(h[-1, -1], weight.sum())
    torch.testing.assert_close(h[:-1, -1], weight @ a)
    torch.testing.assert_close(h[-1, :-1], weight @ b)
    torch.testing.assert_close(h[:-1, :-1], (a * weight[:, None]).T @ b)


def permuted(t: torch.Tensor) -> torch.Tensor:
    """Same values, reversed memory layout (column-major for a matrix)."""
    return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))


@pytest.mark.parametrize("layout", ["permuted", "sliced", "expanded", "leading_dims"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_any_strides_and_leading_dimensions(layout, dtype):
    a, b, weight = make_inputs(60, 21, 9, dtype=dtype, seed=4)
    if layout == "permuted":
        a, b = permuted(a), permuted(b)
        assert not a.is_contiguous() and not b.is_contiguous()
    elif layout == "sliced":
        a = torch.zeros(120, 50, dtype=dtype)[::2, 3:24].copy_(a)
        b = torch.zeros(60, 27, dtype=dtype)[:, ::3].copy_(b)  # stride 3 along the features
        weight = torch.zeros(180, dtype=dtype)[::3].copy_(weight)
    elif layout == "expanded":
        a = a[:1].expand(60, 21)  # stride 0 along samples: every sample is the same input
        weight = weight[:1].expand(60)
    elif layout == "leading_dims":
        a = a.reshape(4, 15, 21).transpose(0, 1)  # (tokens, batch, in): not viewable as (N, in)
        b = b.reshape(3, 20, 9)  # other leading dimensions, same N = 60
    for use_b, use_weight in VARIANTS:
        check(a, b if use_b else None, weight if use_weight else None)


def test_empty_sample_set_gives_zeros():
    h = ops.gram(torch.empty(0, 4), torch.empty(0, 2), torch.empty(0))
    assert h.shape == (5, 3) and torch.count_nonzero(h) == 0
    assert torch.count_nonzero(ops.gram(torch.empty(2, 0, 3))) == 0


def test_no_features_leaves_the_counts():
    a, b, weight = torch.empty(6, 0), torch.randn(6, 2), torch.rand(6)
    h = ops.gram(a, b, weight)
    assert h.shape == (1, 3)
    torch.testing.assert_close(h[0], torch.cat([weight @ b, weight.sum().reshape(1)]))
    assert ops.gram(a).item() == 6.0


@pytest.mark.parametrize("use_b, use_weight", VARIANTS)
def test_merge_of_halves_equals_one_pass(use_b, use_weight):
    """Grams of disjoint samples add: streaming (and all_reduce SUM across ranks) is exact."""
    a, b, weight = make_inputs(1001, 37, 19, torch.float32, seed=5)
    b, weight = (b if use_b else None), (weight if use_weight else None)

    def part(rows: slice) -> torch.Tensor:
        return ops.gram(a[rows], None if b is None else b[rows], None if weight is None else weight[rows])

    merged = part(slice(0, 400)) + part(slice(400, None))
    assert_matches(merged, ops.gram(a, b, weight), 2e-5, "merged vs one pass")
    assert_matches(merged, reference.gram(a, b, weight), 2e-5, "merged vs reference")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300),
    in_a=st.integers(0, 40),
    in_b=st.integers(0, 40),
    use_b=st.booleans(),
    use_weight=st.booleans(),
    offset=st.floats(-100, 100),
)
def test_property_matches_reference(n, in_a, in_b, use_b, use_weight, offset):
    a, b, weight = make_inputs(n, in_a, in_b, torch.float64, seed=n)
    check(a + offset, b if use_b else None, weight if use_weight else None, 1e-12)


# ---- op registration: opcheck, FakeTensor, torch.compile ----------------------------------------


def sample_inputs() -> list[tuple]:
    """Argument tuples of ecp.gram: contiguous and permuted, every optional argument, mixed dtypes."""
    samples = []
    for layout in ("contiguous", "permuted"):
        a, b, weight = make_inputs(37, 11, 7, torch.float32)
        if layout == "permuted":
            a, b = permuted(a), permuted(b)
        samples += [(a, None, None, False), (a, b, None, False), (a, None, weight, False), (a, b, weight, True)]
    a, b, weight = make_inputs(9, 4, 3, torch.bfloat16)
    samples.append((a.reshape(3, 3, 4), b.double(), weight, False))
    return samples


@pytest.mark.parametrize("args", sample_inputs(), ids=lambda args: f"b={args[1] is not None}-w={args[2] is not None}")
def test_opcheck(args):
    torch.library.opcheck(torch.ops.ecp.gram.default, args)


def test_fake_tensor_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(8, 5, 6, dtype=torch.bfloat16)
        b = torch.empty(40, 3, dtype=torch.float64)
        h = torch.ops.ecp.gram(a, b, torch.empty(40))
        h_flag = torch.ops.ecp.gram(a, float64=True)
    assert h.shape == (7, 4) and h.dtype == torch.float64
    assert h_flag.shape == (7, 7) and h_flag.dtype == torch.float64


def test_torch_compile_fullgraph():
    def refit_system(a, b, weight):
        h = torch.ops.ecp.gram(a, b, weight)
        return h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], h.shape[1])

    a, b, weight = make_inputs(50, 12, 6, torch.float32)
    compiled = torch.compile(refit_system, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(a, b, weight), refit_system(a, b, weight))


# ---- bad input: the message names the argument, the expected and the actual value -----------------

BACKENDS = {"op": ops.gram, "reference": reference.gram}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "a_shape, b_shape, w_shape, pattern",
    [
        ((5,), None, None, r"ecp.gram: argument 'a' must have at least 2 dimensions .*got shape \(5,\)"),
        ((17, 5), (3,), None, r"argument 'b' must have at least 2 dimensions .*got shape \(3,\)"),
        (
            (17, 5),
            (16, 3),
            None,
            r"argument 'b' must have N = 17 samples .*'a' of shape \(17, 5\), got shape \(16, 3\)",
        ),
        ((17, 5), None, (16,), r"ecp.gram: argument 'weight' must have shape \(N,\) = \(17,\) .*got shape \(16,\)"),
        ((17, 5), None, (17, 1), r"argument 'weight' must have shape \(N,\) = \(17,\) .*got shape \(17, 1\)"),
        ((2, 3, 5), (5, 3), (6,), r"argument 'b' must have N = 6 samples .*got shape \(5, 3\)"),
    ],
)
def test_bad_shapes_are_named(backend, a_shape, b_shape, w_shape, pattern):
    b = None if b_shape is None else torch.randn(b_shape)
    weight = None if w_shape is None else torch.rand(w_shape)
    with pytest.raises(ValueError, match=pattern):
        BACKENDS[backend](torch.randn(a_shape), b, weight)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("argument", ["a", "b", "weight"])
def test_integer_dtype_and_other_device_are_named(backend, argument):
    tensors = {"a": torch.randn(6, 4), "b": torch.randn(6, 3), "weight": torch.rand(6)}
    tensors[argument] = tensors[argument].to(torch.int64)
    with pytest.raises(TypeError, match=rf"ecp.gram: argument '{argument}' must have dtype float32.*got torch.int64"):
        BACKENDS[backend](**tensors)
    if argument != "a":
        tensors[argument] = torch.randn(tensors[argument].shape, device="meta")
        with pytest.raises(
            ValueError, match=rf"argument '{argument}' must be on the same device as 'a' \(cpu\), got meta"
        ):
            BACKENDS[backend](**tensors)


def test_wrapper_names_non_tensor_arguments():
    with pytest.raises(TypeError, match=r"ecp.gram: argument 'a' must be a torch.Tensor, got NoneType"):
        ops.gram(None)
    with pytest.raises(TypeError, match=r"ecp.gram: argument 'weight' must be a torch.Tensor, got list"):
        ops.gram(torch.randn(3, 2), weight=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match=r"ecp.gram: argument 'float64' must be a bool, got str"):
        ops.gram(torch.randn(3, 2), float64="yes")


# ---- extreme values --------------------------------------------------------------------------------


def test_float32_overflow_is_summed_again_in_float64():
    """+1e40 - 1e40 is inf - inf = NaN in float32 sums; the float64 reference says 0, and so must the op."""
    a = torch.tensor([[1e20], [1e20]])
    b = torch.tensor([[1e20], [-1e20]])
    h = ops.gram(a, b)
    expected = reference.gram(a, b)
    assert h[0, 0] == 0 and expected[0, 0] == 0
    assert torch.equal(h, expected)
    # Where the float64 value exceeds float32's range, both are infinite.
    assert torch.isinf(ops.gram(a)[0, 0]) and torch.isinf(reference.gram(a)[0, 0])


def test_nan_propagates_like_the_reference():
    a, b, weight = make_inputs(40, 5, 3, torch.float32, seed=6)
    a[7, 2] = float("nan")
    weight[11] = float("nan")
    for use_b, use_weight in VARIANTS:
        args = (a, b if use_b else None, weight if use_weight else None)
        actual, expected = ops.gram(*args), reference.gram(*args)
        assert torch.equal(actual.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert_matches(actual[finite], expected[finite], 2e-5)
