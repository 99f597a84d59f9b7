"""merge_moments: Chan's pairwise merge is exact, associative, and neutral for empty parts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ecp_fast
from ecp_fast.ops import reference


def _parts(n: int, cuts: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64) * 3 + 7
    g = torch.randn(2, n, 4, generator=generator, dtype=torch.float64)
    bounds = [0, *sorted(cuts), n]
    return x, g, [(x[a:b], g[:, a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 200), data=st.data())
def test_streaming_merge_equals_one_pass(n, data):
    cuts = data.draw(st.lists(st.integers(0, n), max_size=5))
    x, g, parts = _parts(n, cuts, seed=n)
    merged = None
    for part_x, part_g in parts:
        moments = reference.moments(part_x, part_g)
        merged = moments if merged is None else ecp_fast.merge_moments(merged, moments)
    for m, e in zip(merged, reference.moments(x, g), strict=True):
        torch.testing.assert_close(m, e, rtol=1e-10, atol=1e-9)


def test_merge_is_associative():
    _, _, parts = _parts(90, [20, 55], seed=0)
    a, b, c = (reference.moments(px, pg) for px, pg in parts)
    left = ecp_fast.merge_moments(ecp_fast.merge_moments(a, b), c)
    right = ecp_fast.merge_moments(a, ecp_fast.merge_moments(b, c))
    for l_, r_ in zip(left, right, strict=True):
        torch.testing.assert_close(l_, r_, rtol=1e-12, atol=1e-10)


def test_merge_with_dead_rows_keeps_zeros():
    x, g, parts = _parts(40, [15], seed=3)
    (xa, ga), (xb, gb) = parts
    ga = ga.clone()
    ga[:, :, 1] = 0
    gb = gb.clone()
    gb[:, :, 1] = 0
    merged = ecp_fast.merge_moments(reference.moments(xa, ga), reference.moments(xb, gb))
    assert merged.s0[1] == 0 and merged.mean[1].abs().max() == 0 and merged.m2[1].abs().max() == 0


def test_merge_rejects_mismatched_parts():
    a = reference.moments(torch.randn(5, 3), torch.randn(5, 2))
    b = reference.moments(torch.randn(5, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="'mean' of both parts must have the same shape"):
        ecp_fast.merge_moments(a, b)


@pytest.mark.parametrize(
    "scale, cut, later",
    [(1e20, 3, 1e20), (1e19, 3, 1e19), (1e20, 5, 1e10)],
    ids=["both-parts-overflow", "only-the-sum-overflows", "one-part-overflows"],
)
def test_merge_where_s0_overflows_float32_agrees_with_one_pass(scale, cut, later):
    """S0 beyond float32 (inf) must not make the merged mean and m2 NaN where one pass's are finite (or
    inf); rows whose S0 is finite merge with the unchanged arithmetic, bit for bit."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=generator)
    x[:, 2] = 4.0  # constant: m2 = 0 in one pass, and no NaN from 0 * inf in the merge
    g = torch.randn(6, 2, generator=generator)
    g[:cut, 0], g[cut:, 0] = scale, later  # row 0: c = scale^2, then later^2, per sample
    one_pass = ecp_fast.ops.moments(x, g)
    parts = ecp_fast.ops.moments(x[:cut], g[:cut]), ecp_fast.ops.moments(x[cut:], g[cut:])
    merged = ecp_fast.merge_moments(*parts)
    assert merged.s0[0].isposinf() and one_pass.s0[0].isposinf()
    torch.testing.assert_close(merged.mean, one_pass.mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(merged.m2[0], one_pass.m2[0], rtol=1e-5, atol=0)  # inf where one pass is
    s0_a, s0_b = parts[0].s0[1:], parts[1].s0[1:]
    weight_b = (s0_b / (s0_a + s0_b)).unsqueeze(-1)
    delta = parts[1].mean[1:] - parts[0].mean[1:]
    assert torch.equal(merged.mean[1:], parts[0].mean[1:] + delta * weight_b)
    m2 = parts[0].m2[1:] + parts[1].m2[1:] + delta.square() * s0_a.unsqueeze(-1) * weight_b
    assert torch.equal(merged.m2[1:], m2)


def test_merge_compiles_into_one_graph_and_merges_alike():
    """The overflow-safe form is chosen per row by the data: a graph being compiled makes it always and
    selects by the same rule (eager makes it only where a row overflowed), with the same results."""

    def merged(x, g):
        return ecp_fast.merge_moments(ecp_fast.moments(x[:20], g[:20]), ecp_fast.moments(x[20:], g[20:]))

    x, g = torch.randn(37, 11), torch.randn(37, 7)
    compiled = torch.compile(merged, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x, g), merged(x, g), strict=True):
        torch.testing.assert_close(got, expected)
    g[:, 0] = 1e25  # row 0's S0 overflows float32 in both parts: the safe form's values
    for got, expected in zip(compiled(x, g), merged(x, g), strict=True):
        torch.testing.assert_close(got, expected, equal_nan=True)
    assert bool(merged(x, g).s0[0].isposinf()) and bool(merged(x, g).mean[0].isfinite().all())
