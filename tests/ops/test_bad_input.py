"""The ops on bad, non-finite and extreme input, and on inputs that require grad.

* Malformed arguments (None, non-tensors, integer dtypes, wrong shapes, other devices) raise
  ``TypeError``/``ValueError`` naming the op and the argument, with the same message from the native
  kernel and the reference; malformed ``merge_moments`` arguments likewise.
* NaN inputs make NaN the statistics they enter, exactly where the reference has NaN (a neuron is
  dead, with zero statistics, only when its ``s0`` is exactly zero).
* Inputs of 1e20 and above never give NaN where the float64 reference is finite: float32 sums that
  overflow are redone in float64, so the op returns the reference's value (or its infinity).
* Inputs that require grad are refused while grad mode is on (the ops have no derivative).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ecp_fast
from ecp_fast import ops
from ecp_fast.ops import reference

OPS = {
    "moments": (ops.moments, reference.moments),
    "score": (ops.score, reference.score),
    "finalize": (ops.finalize, reference.finalize),
    "gram": (ops.gram, reference.gram),
}
# The argument the device check compares the others with, per op.
DEVICE_ANCHOR = {"moments": "x", "score": "x", "finalize": "weight", "gram": "a"}


def valid_arguments(op: str, n: int, fan_in: int, fan_out: int, probes: int) -> dict[str, torch.Tensor]:
    """A well-formed call of ``op`` with ``n`` samples, ``fan_in`` inputs and ``fan_out`` outputs."""
    x = torch.randn(n, fan_in)
    g = torch.randn(n, fan_out) if probes == 1 else torch.randn(probes, n, fan_out)
    weight = torch.randn(fan_out, fan_in)
    if op == "moments":
        return {"x": x, "g": g}
    if op == "score":
        return {"x": x, "g": g, "weight": weight}
    if op == "finalize":
        return {
            "s0": torch.rand(fan_out),
            "mean": torch.randn(fan_out, fan_in),
            "m2": torch.rand(fan_out, fan_in),
            "weight": weight,
        }
    return {"a": x, "b": torch.randn(n, fan_out), "weight": torch.rand(n)}


class BadShape(NamedTuple):
    """A wrong shape for argument ``argument`` and the argument the error must name."""

    argument: str
    shape: Callable[[int, int, int, int], tuple[int, ...]]
    named: str


# (n, fan_in, fan_out, probes) -> shape. Each is wrong whatever the sizes (all >= 1).
BAD_SHAPES = {
    "moments": [
        BadShape("x", lambda n, i, o, p: (n * i,), "x"),
        BadShape("x", lambda n, i, o, p: (n + 1, i), "g"),
        BadShape("g", lambda n, i, o, p: (n * o,), "g"),
        BadShape("g", lambda n, i, o, p: (1, p, n, o), "g"),
        BadShape("g", lambda n, i, o, p: (p, n + 2, o), "g"),
    ],
    "score": [
        BadShape("x", lambda n, i, o, p: (), "x"),
        BadShape("g", lambda n, i, o, p: (n + 1, o), "g"),
        BadShape("weight", lambda n, i, o, p: (o + 1, i), "weight"),
        BadShape("weight", lambda n, i, o, p: (o, i + 2), "weight"),
        BadShape("weight", lambda n, i, o, p: (o * i,), "weight"),
    ],
    "finalize": [
        BadShape("s0", lambda n, i, o, p: (o + 1,), "s0"),
        BadShape("s0", lambda n, i, o, p: (o, 1), "s0"),
        BadShape("mean", lambda n, i, o, p: (o, i + 1), "mean"),
        BadShape("m2", lambda n, i, o, p: (o + 3, i), "m2"),
        BadShape("weight", lambda n, i, o, p: (o * i,), "weight"),
        BadShape("weight", lambda n, i, o, p: (o + 1, i), "s0"),
    ],
    "gram": [
        BadShape("a", lambda n, i, o, p: (n * i,), "a"),
        BadShape("b", lambda n, i, o, p: (o,), "b"),
        BadShape("b", lambda n, i, o, p: (n + 1, o), "b"),
        BadShape("weight", lambda n, i, o, p: (n + 1,), "weight"),
        BadShape("weight", lambda n, i, o, p: (n, 1), "weight"),
    ],
}

NON_FLOATING = [torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64]
NOT_TENSORS = [None, 3, 2.5, "x", [1.0, 2.0]]


def mutated_call(op: str, data: st.DataObject) -> tuple[dict, type, str]:
    """A call of ``op`` with one argument made bad, the exception type and the argument it must name."""
    sizes = (
        data.draw(st.integers(1, 9)),
        data.draw(st.integers(1, 9)),
        data.draw(st.integers(1, 9)),
        data.draw(st.integers(1, 3)),
    )
    arguments = valid_arguments(op, *sizes)
    kind = data.draw(st.sampled_from(["not_tensor", "dtype", "device", "shape"]))
    if kind == "shape":
        bad = data.draw(st.sampled_from(BAD_SHAPES[op]))
        arguments[bad.argument] = torch.randn(bad.shape(*sizes)) if bad.shape(*sizes) else torch.tensor(1.0)
        return arguments, ValueError, bad.named
    name = data.draw(st.sampled_from(sorted(arguments)))
    if kind == "device" and name == DEVICE_ANCHOR[op]:
        name = next(other for other in sorted(arguments) if other != name)
    if kind == "not_tensor":
        value = data.draw(st.sampled_from(NOT_TENSORS))
        if value is None and op == "gram" and name != "a":
            value = "not a tensor"  # None is a valid b or weight
        arguments[name] = value
        return arguments, TypeError, name
    if kind == "dtype":
        arguments[name] = arguments[name].to(data.draw(st.sampled_from(NON_FLOATING)))
        return arguments, TypeError, name
    arguments[name] = arguments[name].to("meta")
    return arguments, ValueError, name


@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), data=st.data())
def test_malformed_arguments_are_named(op, data):
    """Every backend raises the same error, which names the op and the bad argument."""
    arguments, error, named = mutated_call(op, data)
    messages = []
    for implementation in OPS[op]:
        with pytest.raises(error) as raised:
            implementation(**arguments)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"ecp.{op}: argument '{named}'"), messages[0]


@pytest.mark.parametrize(
    "call, pattern",
    [
        (
            lambda x, g, w: ops.score(x, g, w, compensate=None),
            r"ecp.score: argument 'compensate' must be a bool, got NoneType",
        ),
        (lambda x, g, w: ops.score(x, g, w, compensate=1), r"argument 'compensate' must be a bool, got int"),
        (lambda x, g, w: ops.gram(x, float64=None), r"ecp.gram: argument 'float64' must be a bool, got NoneType"),
        (
            lambda x, g, w: ops.finalize(None, x, x, w),
            r"ecp.finalize: argument 's0' must be a torch.Tensor, got NoneType",
        ),
        (lambda x, g, w: ops.moments(x, None), r"ecp.moments: argument 'g' must be a torch.Tensor, got NoneType"),
    ],
)
def test_flags_and_none_in_wrappers(call, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(torch.randn(5, 3), torch.randn(5, 2), torch.randn(2, 3))


# Every Tensor argument of the schemas but gram's optional b and weight.
REQUIRED_TENSORS = [
    (op, argument)
    for op in sorted(OPS)
    for argument in valid_arguments(op, 3, 2, 2, 1)
    if op != "gram" or argument == "a"
]


@pytest.mark.parametrize("op, argument", REQUIRED_TENSORS)
def test_none_for_a_required_tensor_of_the_registered_op_is_named(op, argument):
    """torch.ops.ecp.* called directly (C++, TorchScript, compiled graphs) with None: the kernel gets an
    undefined tensor and must name the op and the argument, like the fake kernel and the wrappers."""
    arguments: dict = valid_arguments(op, 5, 3, 2, 1)
    arguments[argument] = None
    pattern = rf"^ecp\.{op}: argument '{argument}' must be a torch\.Tensor, got NoneType$"
    registered = getattr(torch.ops.ecp, op)
    with pytest.raises(TypeError, match=pattern):
        registered(**arguments)
    meta = {name: None if t is None else t.to("meta") for name, t in arguments.items()}
    with pytest.raises(TypeError, match=pattern):
        registered(**meta)


# ---- merge_moments ------------------------------------------------------------------------------


def malformed_part(data: st.DataObject, triple: tuple) -> tuple[object, type, str]:
    """A malformed (s0, mean, m2) part, the exception type and a pattern its message must match."""
    kind = data.draw(st.sampled_from(["type", "length", "field_type", "field_dtype", "field_shape", "field_device"]))
    if kind == "type":
        return (
            data.draw(st.sampled_from([None, 3, "moments", triple[0]])),
            TypeError,
            "must be an \\(s0, mean, m2\\) triple",
        )
    if kind == "length":
        part = data.draw(st.sampled_from([(), triple[:2], (*triple, triple[0])]))
        return part, ValueError, f"triple, got a tuple of length {len(part)}"
    index = data.draw(st.integers(0, 2))
    field = ("s0", "mean", "m2")[index]
    part = list(triple)
    if kind == "field_type":
        part[index] = data.draw(st.sampled_from([None, 1.0, [0.0]]))
        return tuple(part), TypeError, f"'{field}' of argument '.' must be a torch.Tensor"
    if kind == "field_dtype":
        part[index] = part[index].to(data.draw(st.sampled_from(NON_FLOATING)))
        return tuple(part), TypeError, f"'{field}' of argument '.' must have a floating dtype"
    if kind == "field_device":
        index = data.draw(st.integers(1, 2))  # s0 is what the others are compared with
        part[index] = part[index].to("meta")
        return tuple(part), ValueError, f"'{('s0', 'mean', 'm2')[index]}' of argument '.' must be on the same device"
    part[index] = torch.cat([part[index], part[index][:1]])  # one row too many
    named = "s0" if index < 2 else "m2"
    return tuple(part), ValueError, f"'{named}' of argument '.' must have the shape"


@settings(max_examples=60, deadline=None)
@given(data=st.data(), which=st.sampled_from(["a", "b"]))
def test_malformed_merge_arguments_are_named(data, which):
    good = reference.moments(torch.randn(6, 4), torch.randn(6, 3))
    bad, error, pattern = malformed_part(data, tuple(good))
    arguments = {"a": good, "b": good, which: bad}
    with pytest.raises(error, match=pattern) as raised:
        ecp_fast.merge_moments(**arguments)
    assert "merge_moments:" in str(raised.value) and f"argument '{which}'" in str(raised.value)


def test_merge_of_parts_with_different_shapes_or_devices():
    a = reference.moments(torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"'s0' of both parts must have the same shape, got \(2,\) and \(3,\)"):
        ecp_fast.merge_moments(a, reference.moments(torch.randn(5, 3), torch.randn(5, 3)))
    with pytest.raises(ValueError, match=r"both parts must be on the same device, got cpu and meta"):
        ecp_fast.merge_moments(a, tuple(t.to("meta") for t in a))


def test_zero_dimensional_merge_parts_say_what_is_expected():
    scalar = torch.ones(())
    pattern = r"^merge_moments: 'mean' of argument 'a' must have at least 1 dimension, \(\.\.\., in\), got shape \(\)$"
    with pytest.raises(ValueError, match=pattern):
        ecp_fast.merge_moments((scalar, scalar, scalar), (scalar, scalar, scalar))


# ---- NaN and extreme values ---------------------------------------------------------------------


def layer(n: int, fan_in: int, fan_out: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, fan_in, generator=generator) + 1.0).to(dtype)
    g = torch.randn(2, n, fan_out, generator=generator).to(dtype)
    g[:, :, 0] = 0.0  # one dead neuron: its zeros must survive NaN and huge inputs
    weight = torch.randn(fan_out, fan_in, generator=generator).to(dtype)
    return x, g, weight


def outputs(op: str, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, backend: int) -> tuple:
    """The outputs of ``op`` (0: the op, 1: the reference) on one layer, as a tuple of tensors."""
    run = OPS[op.split("-")[0]][backend]
    if op == "moments":
        return tuple(run(x, g))
    if op.startswith("score"):
        return run(x, g, weight, op == "score")
    if op == "finalize":
        s0, mean, m2 = reference.moments(x, g)
        return run(s0.to(x.dtype), mean.to(x.dtype), m2.to(x.dtype), weight)
    sample_weight = g[0, :, 1].abs()
    return (run(x, g[0], sample_weight),) if op == "gram-cross" else (run(x, None, sample_weight),)


OUTPUT_OPS = ["moments", "score", "score-uncompensated", "finalize", "gram", "gram-cross"]
# Outputs that are sums without cancellation, or element-wise products: the op must match the
# reference there even for huge inputs. m2 (and the importance w^2 m2 of one pass) is s2 - s1^2/s0,
# which for one sample weighted 1e40 cancels to rounding noise in the reference's float64 as much as
# in the kernel's: there both are only required to be non-negative and NaN where the other is.
WELL_CONDITIONED = {
    "moments": (0, 1),
    "score": (1,),
    "score-uncompensated": (0, 1),
    "finalize": (0, 1),
    "gram": (0,),
    "gram-cross": (0,),
}


def assert_agrees(op: str, got: tuple, expected: tuple) -> None:
    """NaN exactly where the reference has NaN; well-conditioned outputs equal to rounding, infinities included."""
    for index, (a, e) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.isnan(), e.isnan()), (
            f"output {index}: NaN at {(a.isnan() ^ e.isnan()).nonzero()[:3].tolist()}"
        )
        if index not in WELL_CONDITIONED[op]:
            assert not (a < 0).any(), f"output {index} is negative"
            continue
        assert torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()]), (
            f"output {index}: inf differs"
        )
        finite = e.isfinite()
        if finite.any():
            scale = e[finite].abs().max().double()
            error = (a[finite].double() - e[finite].double()).abs()
            assert error.max() <= 1e-4 * scale + 1e-30, f"output {index}: error {error.max():.3g} at scale {scale:.3g}"


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(OUTPUT_OPS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    where=st.sampled_from(["x", "g", "weight"]),
    positions=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 5)), min_size=1, max_size=3),
    seed=st.integers(0, 100),
)
def test_nan_propagates_like_the_reference(op, dtype, where, positions, seed):
    x, g, weight = layer(301, 6, 4, dtype, seed)
    target = {"x": x, "g": g[1], "weight": weight}[where]
    for row, column in positions:
        target[row % target.shape[0], column % target.shape[1]] = float("nan")
    assert_agrees(op, outputs(op, x, g, weight, 0), outputs(op, x, g, weight, 1))


@settings(max_examples=60, deadline=None)
@given(
    op=st.sampled_from(OUTPUT_OPS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    where=st.sampled_from(["x", "g", "weight", "column", "all"]),
    exponent=st.floats(20, 38),
    sign=st.sampled_from([1.0, -1.0]),
    seed=st.integers(0, 100),
)
def test_huge_values_never_give_nan_where_the_reference_is_finite(op, dtype, where, exponent, sign, seed):
    """1e20 .. 1e38 (float32 sums overflow beyond about 1e19): the reference's values and infinities."""
    x, g, weight = layer(301, 6, 4, dtype, seed)
    huge = sign * 10.0**exponent
    if where == "column":
        x[:, 2] = huge  # a constant column: m2 = 0 exactly, w^2 m2 must not become inf * 0
    elif where == "all":
        x.mul_(huge / x.abs().max())  # the largest input is ``huge`` itself: huge, but not infinite
        g.mul_(10.0 ** (exponent / 4))
    else:
        target = {"x": x, "g": g[0], "weight": weight}[where]
        target[seed % target.shape[0], seed % target.shape[1]] = huge
    got, expected = outputs(op, x, g, weight, 0), outputs(op, x, g, weight, 1)
    for a, e in zip(got, expected, strict=True):
        assert not (a.isnan() & e.isfinite()).any(), "NaN where the reference is finite"
    assert_agrees(op, got, expected)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    signs=st.lists(st.sampled_from([1.0, -1.0]), min_size=1, max_size=3),
    rows=st.lists(st.integers(0, 300), min_size=3, max_size=3),
    column=st.integers(0, 5),
    seed=st.integers(0, 100),
)
def test_infinite_input_gives_the_uncompensated_importance_inf(dtype, signs, rows, column, seed):
    """w^2 sum_s c a^2 is inf where an activation is +-inf (NaN only where c or w is 0 there, as in the
    reference), inside or after the samples the kernel's shift is taken from."""
    x, g, weight = layer(301, 6, 4, dtype, seed)
    for sign, row in zip(signs, rows, strict=False):
        x[row, column] = sign * float("inf")
    got, expected = outputs("score-uncompensated", x, g, weight, 0), outputs("score-uncompensated", x, g, weight, 1)
    assert bool(expected[0][1:, column].isposinf().any()), "the reference has an infinite importance"
    assert_agrees("score-uncompensated", got, expected)


def test_importance_in_range_is_finite_where_m2_overflows_float32():
    """m2 = 2e40 is beyond float32, w^2 m2 = 2e36 (or 0 for w = 0) is not: the op and the reference give
    the float64 value rounded once, and elsewhere the reference is still finalize(moments), bit for bit."""
    x = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0]])
    g = torch.tensor([[1e20, 1.0], [1e20, 2.0]])  # row 0: c = 1e40 per sample, row 1: ordinary
    weight = torch.tensor([[1e-2, 0.0, 3.0], [0.5, -2.0, 1e-3]])
    wide = reference.score(x.double(), g.double(), weight.double())
    for score in (ops.score, reference.score):
        importance, bias_delta = score(x, g, weight)
        assert torch.equal(importance[0], wide[0][0].float()), importance[0]  # [2e36, 0, 0]: no inf, no NaN
        torch.testing.assert_close(bias_delta, wide[1].float(), rtol=1e-6, atol=0)
    importance, bias_delta = reference.score(x, g, weight)
    finalized = reference.finalize(*reference.moments(x, g), weight)
    assert torch.equal(importance[1], finalized[0][1]) and torch.equal(bias_delta, finalized[1])


def test_products_that_float32_factors_lose_to_underflow_are_rounded_once_from_float64():
    """w = 1e-25 squares to 0 in float32 though w^2 m2 is 1e-13; m2 = 1e-60 rounds to 0 though w^2 m2 is
    24 for w = 1e30: the op and the reference give the float64 product rounded once."""
    g = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]])
    x = torch.tensor([[0.0, 1.0, 4.0], [2.0, 3.0, 5.0], [1.0, 7.0, 5.5]])
    for x_scale, w_scale in ((1e18, 1e-25), (1e-30, 1e30)):
        weight = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]]) * w_scale
        wide = reference.score((x * x_scale).double(), g.double(), weight.double())[0].float()
        assert bool((wide > 0).all())
        for score in (ops.score, reference.score):
            importance = score(x * x_scale, g, weight)[0]
            torch.testing.assert_close(importance, wide, rtol=1e-5, atol=0)
    s0, mean, m2 = reference.moments((x * 1e18).double(), g.double())
    weight = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]]) * 1e-25
    expected = reference.finalize(s0, mean, m2, weight.double())[0].float()
    for finalize in (ops.finalize, reference.finalize):
        torch.testing.assert_close(
            finalize(s0.float(), mean.float(), m2.float(), weight)[0], expected, rtol=1e-6, atol=0
        )


@pytest.mark.parametrize("moments", [ops.moments, reference.moments])
def test_a_row_whose_s0_rounds_to_zero_has_zero_statistics(moments):
    """c = g^2 = 1e-60 sums to a float64 s0 that float32 rounds to 0: the row is dead, mean and m2 zero."""
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    g = torch.tensor([[1e-30, 1.0], [2e-30, 1.0]])
    s0, mean, m2 = moments(x, g)
    assert s0[0] == 0 and not bool(mean[0].any()) and not bool(m2[0].any())
    assert s0[1] == 2 and torch.equal(mean[1], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("op", ["moments", "score", "score-uncompensated", "finalize"])
def test_nan_gradients_do_not_make_a_dead_neuron(op):
    """The C++ kernel used to give such a neuron zero statistics; now it is NaN, like the reference."""
    x, g, weight = layer(50, 5, 4, torch.float32, seed=1)
    g[1, 17, 2] = float("nan")
    got = outputs(op, x, g, weight, 0)
    for t in got:
        assert t[2].isnan().all() if op != "score-uncompensated" or t is got[0] else True
        assert not t[[0, 1, 3]].isnan().any()
    assert_agrees(op, got, outputs(op, x, g, weight, 1))


# ---- autograd -----------------------------------------------------------------------------------

CALLS = {
    "moments": lambda t: ops.moments(t["x"], t["g"]),
    "score": lambda t: ops.score(t["x"], t["g"], t["weight"]),
    "finalize": lambda t: ops.finalize(t["s0"], t["mean"], t["m2"], t["weight"]),
    "gram": lambda t: (ops.gram(t["a"], t["b"], t["weight"]),),
}


@pytest.mark.parametrize(
    "op, argument",
    [(op, argument) for op in sorted(OPS) for argument in valid_arguments(op, 3, 2, 2, 1)],
)
def test_inputs_that_require_grad_are_refused(op, argument):
    """No derivative: refused while grad mode is on; under no_grad or detached, outputs are plain."""
    tensors = valid_arguments(op, 7, 3, 2, 1)
    tensors[argument].requires_grad_(True)
    pattern = (
        rf"ecp.{op}: argument '{argument}' requires grad, but the ecp ops have no derivative; "
        rf"pass {argument}.detach\(\)"
    )
    with pytest.raises(RuntimeError, match=pattern):
        CALLS[op](tensors)
    with torch.no_grad():
        assert not any(t.requires_grad for t in CALLS[op](tensors))
    tensors[argument] = tensors[argument].detach()
    assert not any(t.requires_grad for t in CALLS[op](tensors))
