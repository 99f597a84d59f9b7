"""Optimal Brain Surgeon sweep and least-squares refit checked against the linear algebra they solve."""

import copy
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ecp_fast

try:
    from ecp_fast.pruning import obs
except Exception:  # standalone run while the package is being reorganised
    import importlib.util
    import pathlib
    import sys

    _path = pathlib.Path(__file__).resolve().parents[2] / "ecp_fast" / "pruning" / "obs.py"
    _spec = importlib.util.spec_from_file_location("obs", _path)
    obs = importlib.util.module_from_spec(_spec)
    sys.modules.setdefault(_spec.name, obs)
    _spec.loader.exec_module(obs)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors through many small ops: extra threads only spin on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _gram(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    xa = _augment(x)
    weights = torch.ones(x.shape[0], dtype=x.dtype) if weights is None else weights
    return (xa * weights[:, None]).T @ xa


def _problem(out: int, n_in: int, samples: int = 64, seed: int = 0, dead: tuple[int, ...] = ()):
    """Random layer with correlated, non-centred inputs and positive sample weights."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g, dtype=F64) / math.sqrt(n_in) + torch.eye(n_in, dtype=F64)
    offset = 0.5 * torch.randn(n_in, generator=g, dtype=F64)
    x = torch.randn(samples, n_in, generator=g, dtype=F64) @ mixing + offset
    x[:, list(dead)] = 0
    sample_weights = 0.5 + torch.rand(samples, generator=g, dtype=F64)
    weight = torch.randn(out, n_in, generator=g, dtype=F64)
    bias = torch.randn(out, generator=g, dtype=F64)
    return weight, bias, x, sample_weights, _gram(x, sample_weights)


def _row(weight: torch.Tensor, bias: torch.Tensor, i: int) -> torch.Tensor:
    """Augmented row w~_i = [W_i | b_i]."""
    return torch.cat([weight[i], bias[i : i + 1]])


def _random_mask(out: int, n_in: int, seed: int, keep_fraction: float = 0.5) -> torch.Tensor:
    return torch.rand(out, n_in, generator=torch.Generator().manual_seed(seed)) < keep_fraction


def _sequential_obs(row: torch.Tensor, damped: torch.Tensor, pruned: list[int]) -> torch.Tensor:
    """Left-to-right OBS by direct solves: removing column q re-optimises only the columns after
    it, min over d_F of [d_q; d_F]^T H[q:, q:] [d_q; d_F] with d_q = -w_q."""
    w = row.clone()
    for q in sorted(pruned):
        w[q + 1 :] += torch.linalg.solve(damped[q + 1 :, q + 1 :], damped[q + 1 :, q]) * w[q]
        w[q] = 0
    return w


def _constrained_least_squares(row: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """argmin over w supported on keep of (w - row)^T metric (w - row): e_K = M_KK^-1 M_KP w_P."""
    kept, pruned = torch.nonzero(keep).flatten(), torch.nonzero(~keep).flatten()
    w = torch.zeros_like(row)
    shift = torch.linalg.solve(metric[kept][:, kept], metric[kept][:, pruned] @ row[pruned])
    w[kept] = row[kept] + shift
    return w


# ------------------------------------------------------------------ 1. closed-form OBS


def test_first_column_removal_is_the_closed_form_obs_update():
    weight, bias, _, _, gram = _problem(1, 6, seed=1)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 0] = False
    result = obs.obs_sweep(weight, bias, gram, mask=mask)
    hinv = torch.linalg.inv(obs.dampen(gram, 0.01))
    old = torch.cat([weight[0], bias])
    expected = old - old[0] * hinv[:, 0] / hinv[0, 0]
    assert abs(expected[0]) < 1e-12
    torch.testing.assert_close(torch.cat([result.weight[0], result.bias]), expected, rtol=0, atol=1e-10)


def test_single_removal_cost_is_w_squared_over_hinv_diagonal():
    weight, bias, _, _, gram = _problem(1, 6, seed=2)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 0] = False
    result = obs.obs_sweep(weight, bias, gram, mask=mask, damp=0.0)
    hinv = torch.linalg.inv(gram)
    assert result.error == pytest.approx(float(weight[0, 0] ** 2 / hinv[0, 0]), rel=1e-10)


@pytest.mark.parametrize("q", [2, 5])
def test_later_column_removal_is_the_closed_form_on_the_trailing_columns(q):
    # The sweep freezes the columns it has passed, so removing column q is OBS on H[q:, q:].
    weight, bias, _, _, gram = _problem(1, 6, seed=3)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, q] = False
    result = obs.obs_sweep(weight, bias, gram, mask=mask, block_size=4)
    hinv = torch.linalg.inv(obs.dampen(gram, 0.01)[q:, q:])
    old = torch.cat([weight[0], bias])
    expected = old.clone()
    expected[q:] -= old[q] * hinv[:, 0] / hinv[0, 0]
    torch.testing.assert_close(torch.cat([result.weight[0], result.bias]), expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ 2. fixed mask


@pytest.mark.parametrize("block_size", [1, 4, 5, 13, 14, 128])
def test_fixed_mask_sweep_is_sequential_obs(block_size):
    weight, bias, _, _, gram = _problem(6, 13, seed=4)
    mask = _random_mask(6, 13, seed=5)
    result = obs.obs_sweep(weight, bias, gram, mask=mask, block_size=block_size)
    damped = obs.dampen(gram, 0.01)
    for i in range(6):
        pruned = torch.nonzero(~mask[i]).flatten().tolist()
        expected = _sequential_obs(_row(weight, bias, i), damped, pruned)
        torch.testing.assert_close(_row(result.weight, result.bias, i), expected, rtol=0, atol=1e-10)
    assert torch.equal(result.mask, mask)
    assert torch.all(result.weight[~mask] == 0)
    direct = obs.reconstruction_error(weight, bias, result.weight, result.bias, gram)
    assert result.error == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("block_size", [1, 4, 5, 128])
def test_sweep_with_pruned_columns_first_is_constrained_least_squares(block_size):
    # When every pruned column precedes every kept one, freezing passed columns loses nothing:
    # the sweep is the exact minimiser of the dampened quadratic on the kept support (+ bias).
    out, n_in = 7, 13
    weight, bias, _, _, gram = _problem(out, n_in, seed=6)
    mask = torch.arange(n_in)[None, :] >= torch.tensor([0, 1, 3, 6, 9, 12, 13])[:, None]
    result = obs.obs_sweep(weight, bias, gram, mask=mask, block_size=block_size)
    damped = obs.dampen(gram, 0.01)
    keep = torch.cat([mask, torch.ones(out, 1, dtype=torch.bool)], dim=1)
    for i in range(out):
        expected = _constrained_least_squares(_row(weight, bias, i), damped, keep[i])
        torch.testing.assert_close(_row(result.weight, result.bias, i), expected, rtol=0, atol=1e-10)


def test_refit_without_cross_term_is_the_global_constrained_optimum_the_sweep_cannot_beat():
    # ridge * damping_scale(H) * ||w - w0||^2 turns the refit objective into the dampened quadratic,
    # so refit is the global optimum on each support, for any mask; the sweep is feasible for it.
    out, n_in = 6, 13
    weight, bias, _, _, gram = _problem(out, n_in, seed=7)
    mask = _random_mask(out, n_in, seed=8)
    new_weight, new_bias = obs.refit(weight, bias, mask, gram, ridge=0.01)
    damped = obs.dampen(gram, 0.01)
    keep = torch.cat([mask, torch.ones(out, 1, dtype=torch.bool)], dim=1)
    for i in range(out):
        expected = _constrained_least_squares(_row(weight, bias, i), damped, keep[i])
        torch.testing.assert_close(_row(new_weight, new_bias, i), expected, rtol=0, atol=1e-10)
    swept = obs.obs_sweep(weight, bias, gram, mask=mask, block_size=4)
    refit_error = obs.reconstruction_error(weight, bias, new_weight, new_bias, damped)
    sweep_error = obs.reconstruction_error(weight, bias, swept.weight, swept.bias, damped)
    assert refit_error <= sweep_error * (1 + 1e-12)


def test_fixed_interleaved_mask_sweep_can_lose_to_zeroing_while_refit_cannot():
    # Pruning column 0 moves weight onto column 2, which is pruned later at a higher cost; the
    # kept column 1 between them is frozen. A small exact instance (damp = 0, integer data).
    x = torch.tensor([[0, 2, -2], [0, 0, 1], [1, 0, 0], [-1, -1, 0], [-1, 0, -1]], dtype=F64)
    gram = _gram(x)
    weight, bias = torch.tensor([[2.0, 1.0, 1.0]], dtype=F64), torch.zeros(1, dtype=F64)
    mask = torch.tensor([[False, True, False]])
    zeroing = obs.reconstruction_error(weight, bias, weight * mask, bias, gram)
    swept = obs.obs_sweep(weight, bias, gram, mask=mask, damp=0.0)
    expected = _sequential_obs(torch.tensor([2.0, 1.0, 1.0, 0.0], dtype=F64), gram, [0, 2])
    torch.testing.assert_close(torch.cat([swept.weight[0], swept.bias]), expected, rtol=0, atol=1e-12)
    assert zeroing == pytest.approx(22.0, rel=1e-12)
    assert swept.error > zeroing
    refitted = obs.refit(weight, bias, mask, gram, ridge=0.0)
    assert obs.reconstruction_error(weight, bias, *refitted, gram) <= zeroing


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 4), n_in=st.integers(1, 11), block_size=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_fixed_mask_sweep_is_sequential_obs_for_any_shape(out, n_in, block_size, seed):
    weight, bias, _, _, gram = _problem(out, n_in, samples=3 * n_in + 4, seed=seed)
    mask = _random_mask(out, n_in, seed=seed + 1)
    result = obs.obs_sweep(weight, bias, gram, mask=mask, block_size=block_size)
    damped = obs.dampen(gram, 0.01)
    for i in range(out):
        pruned = torch.nonzero(~mask[i]).flatten().tolist()
        expected = _sequential_obs(_row(weight, bias, i), damped, pruned)
        torch.testing.assert_close(_row(result.weight, result.bias, i), expected, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ 3. refit


def _spread_scale(x, sample_weights):
    """The damping scale from the samples: the weighted sums of squares about the weighted means of the
    inputs and the summed weights (the bias column), averaged."""
    total = sample_weights.sum()
    means = (sample_weights[:, None] * x).sum(0) / total
    spread = (sample_weights[:, None] * (x - means) ** 2).sum(0)
    return float((spread.sum() + total) / (x.shape[1] + 1))


def _lstsq_refit(weight, bias, mask, xp, xd, sample_weights, dense_weight, dense_bias, ridge):
    """Row by row: stacked sqrt(w_s)-weighted design with the ridge rows sqrt(lam) I on K's inputs (the
    bias, last in K, has none: the ridge is taken about the inputs' means)."""
    xpa, xda = _augment(xp), _augment(xd)
    lam = ridge * _spread_scale(xp, sample_weights)
    root = sample_weights.sqrt()[:, None]
    target = root * (xda @ torch.cat([dense_weight, dense_bias[:, None]], dim=1).T)
    current = torch.cat([weight, bias[:, None]], dim=1)
    solution = torch.zeros_like(current)
    for i in range(weight.shape[0]):
        support = torch.nonzero(torch.cat([mask[i], torch.tensor([True])])).flatten()
        ridge_rows = math.sqrt(lam) * torch.eye(len(support), dtype=F64)[:-1]
        design = torch.cat([root * xpa[:, support], ridge_rows])
        rhs = torch.cat([target[:, i], math.sqrt(lam) * current[i, support[:-1]]])
        solution[i, support] = torch.linalg.lstsq(design, rhs[:, None]).solution[:, 0]
    return solution


@pytest.mark.parametrize("path", ["grouped", "padded", "padded-chunked"])
@pytest.mark.parametrize("with_cross", [False, True])
def test_refit_matches_weighted_least_squares(monkeypatch, path, with_cross):
    out, n_in, samples = 9, 12, 80
    weight, bias, xp, sample_weights, gram = _problem(out, n_in, samples=samples, seed=9)
    mask = _random_mask(out, n_in, seed=10, keep_fraction=0.4)
    mask[0] = False  # bias only
    mask[1] = True  # dense row
    if path == "grouped":
        monkeypatch.setattr(obs, "_MAX_GROUPED_SUPPORTS", 10**6)
    else:
        monkeypatch.setattr(obs, "_MAX_GROUPED_SUPPORTS", 0)
    if path == "padded-chunked":
        monkeypatch.setattr(obs, "_MAX_BATCH_ENTRIES", 60)
    g = torch.Generator().manual_seed(11)
    if with_cross:
        xd = xp + 0.3 * torch.randn(samples, n_in, generator=g, dtype=F64)
        dense_weight = weight + 0.2 * torch.randn(out, n_in, generator=g, dtype=F64)
        dense_bias = bias + 0.2 * torch.randn(out, generator=g, dtype=F64)
        cross = (_augment(xp) * sample_weights[:, None]).T @ _augment(xd)
        new_weight, new_bias = obs.refit(
            weight, bias, mask, gram, cross=cross, dense_weight=dense_weight, dense_bias=dense_bias, ridge=0.05
        )
    else:
        xd, dense_weight, dense_bias = xp, weight, bias
        new_weight, new_bias = obs.refit(weight, bias, mask, gram, ridge=0.05)
    expected = _lstsq_refit(weight, bias, mask, xp, xd, sample_weights, dense_weight, dense_bias, 0.05)
    result = torch.cat([new_weight, new_bias[:, None]], dim=1)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    assert torch.all(new_weight[~mask] == 0)


def test_refit_with_zero_ridge_reproduces_an_unpruned_layer_exactly():
    weight, bias, _, _, gram = _problem(5, 8, seed=12)
    new_weight, new_bias = obs.refit(weight, bias, torch.ones(5, 8, dtype=torch.bool), gram, ridge=0.0)
    torch.testing.assert_close(new_weight, weight, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_bias, bias, rtol=0, atol=1e-10)


def test_reconstruction_error_is_the_weighted_squared_output_change():
    weight, bias, x, sample_weights, gram = _problem(4, 9, seed=13)
    new_weight, new_bias = weight * _random_mask(4, 9, seed=14), bias + 0.1
    direct = sample_weights @ ((x @ (new_weight - weight).T + (new_bias - bias)) ** 2).sum(dim=1)
    error = obs.reconstruction_error(weight, bias, new_weight, new_bias, gram)
    assert error == pytest.approx(float(direct), rel=1e-12)


# ------------------------------------------------------------------ 4. exact sparsity


SHAPES = [(1, 1, 128), (1, 7, 128), (3, 7, 4), (5, 13, 5), (7, 130, 128), (11, 29, 8), (2, 128, 128)]


@pytest.mark.parametrize("out,n_in,block_size", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_counts_are_exact_per_block_and_row_counts_per_row(out, n_in, block_size, sparsity):
    """Unstructured: the nearest count of each block. Row: the row's count, as the mask methods' row scope
    removes (the nearest, one kept at least), shared among the blocks by rounding the running total."""
    weight, bias, _, _, gram = _problem(out, n_in, samples=2 * n_in + 4, seed=out * n_in)
    for pattern in ("unstructured", "row"):
        result = obs.obs_sweep(weight, bias, gram, sparsity=sparsity, pattern=pattern, block_size=block_size)
        assert result.mask.shape == (out, n_in) and result.mask.dtype == torch.bool
        running = 0
        for i1 in range(0, n_in, block_size):
            pruned = ~result.mask[:, i1 : i1 + block_size]
            width = pruned.shape[1]
            if pattern == "unstructured":
                assert int(pruned.sum()) == obs.target_count(out * width, sparsity)  # nearest; one kept at least
            else:
                end = i1 + width
                expected = obs.target_count(n_in, sparsity) if end == n_in else math.floor(sparsity * end + 0.5)
                assert pruned.sum(dim=1).tolist() == [expected - running] * out
                running = expected
        if pattern == "row":
            assert (~result.mask).sum(dim=1).tolist() == [obs.target_count(n_in, sparsity)] * out
        _assert_pruned_exactly(result, bias)


@pytest.mark.parametrize(
    "n,m,out,n_in,block_size",
    [(2, 4, 1, 4, 128), (2, 4, 3, 8, 4), (2, 4, 7, 132, 128), (1, 3, 5, 9, 6), (3, 4, 2, 12, 8)],
)
def test_n_of_m_keeps_exactly_n_in_every_aligned_group(n, m, out, n_in, block_size):
    weight, bias, _, _, gram = _problem(out, n_in, samples=2 * n_in + 4, seed=n_in)
    result = obs.obs_sweep(weight, bias, gram, pattern=(n, m), block_size=block_size)
    assert torch.all(result.mask.reshape(out, n_in // m, m).sum(dim=2) == n)
    _assert_pruned_exactly(result, bias)


def _assert_pruned_exactly(result: "obs.ObsResult", bias: torch.Tensor) -> None:
    assert torch.all(result.weight[~result.mask] == 0)
    assert torch.all(result.weight[result.mask] != 0)  # generic data: no kept weight is exactly 0
    assert torch.all(result.bias != 0) and result.bias.shape == bias.shape


# ------------------------------------------------------------------ 5. OBS beats magnitude pruning


def test_obs_beats_zeroing_the_magnitude_mask_on_correlated_inputs():
    out, n_in = 16, 24
    weight, bias, _, _, gram = _problem(out, n_in, samples=200, seed=15)
    count = round(0.625 * out * n_in)  # 0.625 * 16 * 8 is whole: per-block counts add up to it
    magnitude_mask = torch.ones(out * n_in, dtype=torch.bool)
    magnitude_mask[torch.topk(weight.abs().flatten(), count, largest=False).indices] = False
    magnitude_mask = magnitude_mask.reshape(out, n_in)
    zeroing = obs.reconstruction_error(weight, bias, weight * magnitude_mask, bias, gram)
    # Theorem: the global optimum on the mask never loses to zeroing (ridge = 0, H is positive definite).
    refitted = obs.refit(weight, bias, magnitude_mask, gram, ridge=0.0)
    assert obs.reconstruction_error(weight, bias, *refitted, gram) <= zeroing
    # Not a theorem for interleaved masks (see the counterexample above), but by far the rule:
    swept = obs.obs_sweep(weight, bias, gram, mask=magnitude_mask, block_size=8)
    assert swept.error < zeroing
    chosen = obs.obs_sweep(weight, bias, gram, sparsity=0.625, block_size=8)
    assert int((~chosen.mask).sum()) == count
    assert chosen.error < swept.error


# ------------------------------------------------------------------ 6. dead inputs


@pytest.mark.parametrize("damp", [0.0, 0.01])
@pytest.mark.parametrize("pattern", ["unstructured", "row", (2, 4)])
def test_dead_inputs_are_pruned_first_and_do_not_break_the_solve(damp, pattern):
    dead = (2, 5)
    weight, bias, x, _, gram = _problem(4, 12, samples=60, seed=16, dead=dead)
    weight[:, list(dead)] = 100.0  # large, so only the dead-input rule can prune them
    assert torch.all(gram[list(dead)] == 0)
    result = obs.obs_sweep(weight, bias, gram, sparsity=0.3, pattern=pattern, damp=damp, block_size=8)
    assert torch.all(torch.isfinite(result.weight)) and math.isfinite(result.error)
    assert not result.mask[:, list(dead)].any()
    assert torch.all(result.weight[:, list(dead)] == 0)
    refitted = obs.refit(weight, bias, result.mask, gram)
    assert torch.all(torch.isfinite(refitted[0])) and torch.all(refitted[0][:, list(dead)] == 0)


@pytest.mark.parametrize("budget", ["block", "layer"])
def test_dead_inputs_the_sparsity_leaves_kept_keep_their_weights_and_move_nothing_else(budget):
    """Fewer removals than dead entries: the kept dead weights stay as they were (no calibration
    sample says otherwise), and what they are changes no other weight of the sweep, bit for bit."""
    dead = (1, 3, 4, 6, 9)
    weight, bias, _, _, gram = _problem(4, 12, samples=60, seed=17, dead=dead)
    result = obs.obs_sweep(weight, bias, gram, sparsity=0.25, block_size=8, budget=budget)  # 12 of 20 dead
    removed_dead = ~result.mask[:, list(dead)]
    assert int((~result.mask).sum()) == 12 and not bool(removed_dead.all())
    assert torch.equal(result.weight[:, list(dead)], torch.where(removed_dead, 0.0, weight[:, list(dead)]))
    zeroed = weight.clone()
    zeroed[:, list(dead)] = 0
    other = obs.obs_sweep(zeroed, bias, gram, sparsity=0.25, block_size=8, budget=budget)
    live = [i for i in range(12) if i not in dead]
    assert torch.equal(other.mask, result.mask)
    assert torch.equal(other.weight[:, live], result.weight[:, live]) and torch.equal(other.bias, result.bias)


@pytest.mark.parametrize("pattern", ["unstructured", "row", (2, 4)])
def test_weights_removed_before_a_sweep_go_first_count_toward_its_target_and_never_return(pattern):
    weight, bias, _, _, gram = _problem(6, 16, samples=60, seed=18)
    removed = torch.rand(6, 16, generator=torch.Generator().manual_seed(19)) < 0.4
    weight = weight * ~removed  # as a pruned model holds them
    sparsity = 0.0 if isinstance(pattern, tuple) else 0.5
    result = obs.obs_sweep(weight, bias, gram, sparsity, pattern=pattern, block_size=16, removed=removed)
    assert not result.mask[removed].any() and torch.all(result.weight[removed] == 0)
    pruned = ~result.mask
    if pattern == "unstructured":  # one block: the target is the layer's
        assert int(pruned.sum()) == max(round(0.5 * 96), int(removed.sum()))
    elif pattern == "row":
        assert torch.equal(pruned.sum(1), removed.sum(1).clamp(min=8))
    else:
        groups = lambda mask: mask.view(6, 4, 4).sum(2)  # noqa: E731
        assert torch.equal(groups(pruned), groups(removed).clamp(min=2))


@pytest.mark.parametrize(
    "pattern,budget", [("unstructured", "block"), ("unstructured", "layer"), ("row", "block"), ((2, 4), "block")]
)
def test_weights_removed_before_a_sweep_go_before_dead_inputs(pattern, budget):
    """Removed weights and dead inputs both scored -inf: the count was spent on whichever topk picked,
    and the removed ones went too, so a dead column was pruned beyond the target (N:M groups emptied)."""
    weight, bias, _, _, gram = _problem(6, 16, samples=60, seed=23, dead=(0, 5))
    removed = torch.zeros(6, 16, dtype=torch.bool)
    removed[:, 3] = True  # one per row and per group of 4 (a column no input kills)
    weight = weight * ~removed
    sparsity = 0.0 if isinstance(pattern, tuple) else 1 / 16
    result = obs.obs_sweep(weight, bias, gram, sparsity, pattern=pattern, budget=budget, removed=removed)
    pruned = ~result.mask
    assert torch.equal(pruned, removed) if pattern != (2, 4) else bool((pruned.view(6, 4, 4).sum(2) == 2).all())
    assert pruned[:, 3].all()


def test_a_removed_mask_of_the_wrong_kind_is_named():
    weight, bias, _, _, gram = _problem(3, 8, seed=20)
    with pytest.raises(TypeError, match="argument 'removed' must be a bool tensor"):
        obs.obs_sweep(weight, bias, gram, 0.5, removed=torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"argument 'removed' must have shape \(3, 8\)"):
        obs.obs_sweep(weight, bias, gram, 0.5, removed=torch.zeros(3, 7, dtype=torch.bool))


def test_dampen_decouples_dead_inputs_and_adds_the_scaled_mean_diagonal_about_the_means():
    gram = torch.tensor([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]], dtype=F64)
    damped = obs.dampen(gram, 0.5)
    shift = 0.5 * ((4.0 - 2.0**2 / 2.0) + 1.0 + 2.0) / 3  # input 0 about its mean, the dead one, the bias
    # the bias entry is not dampened: its change after a shift of the inputs is part of the inputs'
    expected = torch.tensor([[4.0 + shift, 0.0, 2.0], [0.0, 1.0 + shift, 0.0], [2.0, 0.0, 2.0]], dtype=F64)
    torch.testing.assert_close(damped, expected, rtol=0, atol=1e-15)
    assert gram[1, 1] == 0  # a copy


def test_the_damping_scale_ignores_a_shift_the_bias_absorbs_and_is_the_mean_diagonal_without_a_bias():
    _, _, x, sample_weights, gram = _problem(3, 6, seed=4)
    shifted = _gram(x + 1000.0, sample_weights)
    torch.testing.assert_close(obs.damping_scale(shifted), obs.damping_scale(gram), rtol=1e-9, atol=0)
    no_bias = gram.clone()
    no_bias[-1, :] = 0
    no_bias[:, -1] = 0
    assert obs.damping_scale(no_bias) == no_bias.diagonal().mean()


@pytest.mark.parametrize("method,extra", [("sparsegpt", {}), ("ecp-obs", {}), ("magnitude", {"reconstruct": True})])
def test_a_constant_input_offset_the_bias_absorbs_leaves_the_reconstruction_as_good(method, extra):
    """The dense layer computes the same with inputs shifted by 1000 and its bias shifted back; its
    pruned and compensated form is as close to it (dampening scaled by the raw mean diagonal, which grows
    with the shift squared, made it 1.8-3.7 times worse at this shift)."""
    errors = []
    for offset in (0.0, 1000.0):
        torch.manual_seed(0)
        layer = nn.Linear(12, 6).double()
        with torch.no_grad():
            layer.bias -= offset * layer.weight.sum(1)
        x = [torch.randn(100, 12, generator=torch.Generator().manual_seed(i), dtype=F64) + offset for i in range(3)]
        dense = copy.deepcopy(layer)
        batches = [(inputs, torch.randint(0, 6, (100,))) for inputs in x]
        ecp_fast.prune(layer, batches, 0.5, method, scope="layer", progress=False, **extra)
        inputs = torch.cat(x)
        with torch.no_grad():
            target = dense(inputs)
            errors.append(float((layer(inputs) - target).norm() / (target - target.mean(0)).norm()))
    assert errors[1] == pytest.approx(errors[0], rel=1e-6)  # the same solve, up to rounding


# ------------------------------------------------------------------ 7. errors


def test_singular_gram_after_zero_damp_raises_and_names_damp():
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], dtype=F64)  # duplicate inputs
    gram = _gram(x)
    weight, bias = torch.ones(2, 2, dtype=F64), torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match=r"singular after dampening.*damp=0.*larger damp"):
        obs.obs_sweep(weight, bias, gram, sparsity=0.5, damp=0.0)
    assert obs.obs_sweep(weight, bias, gram, sparsity=0.5, damp=0.1).weight.shape == (2, 2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sparsity=1.5), r"'sparsity' must be .*\[0, 1\), got 1.5"),
        (dict(sparsity=1.0), r"'sparsity' must be .*\[0, 1\), got 1.0"),
        (dict(sparsity=-0.1), r"'sparsity' must be .*got -0.1"),
        (dict(pattern="random"), r"'pattern' must be 'unstructured', 'row' or a tuple \(n, m\).*'random'"),
        (dict(pattern=(3, 2)), r"'pattern' .*0 < n <= m.*\(3, 2\)"),
        (dict(pattern=(2, 4)), r"m=4 does not divide in=6"),
        (dict(pattern=(1, 3), block_size=4), r"'block_size' must be a multiple of m=3.*got 4"),
        (dict(block_size=0), r"'block_size' must be an int >= 1, got 0"),
        (dict(damp=-1.0), r"'damp' must be .*got -1.0"),
        (dict(mask=torch.ones(3, 5, dtype=torch.bool)), r"'mask' must have shape \(3, 6\).*got shape \(3, 5\)"),
        (dict(mask=torch.ones(3, 6, dtype=torch.bool), sparsity=0.5), r"'sparsity' must be 0 when an explicit 'mask'"),
        (dict(gram=torch.eye(6, dtype=F64)), r"'gram' must have shape \(7, 7\).*got shape \(6, 6\)"),
        (dict(bias=torch.zeros(4, dtype=F64)), r"'bias' must have shape \(3,\).*\(3, 6\), got shape \(4,\)"),
        (dict(dtype=torch.int64), r"'dtype' must be torch.float32 or torch.float64"),
    ],
)
def test_bad_sweep_arguments_raise_value_errors_naming_them(kwargs, message):
    weight, bias, _, _, gram = _problem(3, 6, seed=17)
    call = dict(weight=weight, bias=bias, gram=gram) | kwargs
    with pytest.raises(ValueError, match=message):
        obs.obs_sweep(**call)


def test_bad_types_and_refit_arguments_raise():
    weight, bias, _, _, gram = _problem(3, 6, seed=18)
    mask = torch.ones(3, 6, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"'mask' must be a bool tensor.*torch.int64"):
        obs.obs_sweep(weight, bias, gram, mask=torch.ones(3, 6, dtype=torch.long))
    with pytest.raises(TypeError, match=r"'weight' must be a floating-point tensor, got list"):
        obs.obs_sweep([[1.0]], None, gram)
    with pytest.raises(ValueError, match=r"'cross' must have shape \(7, 7\).*got shape \(7, 6\)"):
        obs.refit(weight, bias, mask, gram, cross=gram[:, :6])
    with pytest.raises(ValueError, match=r"'dense_weight' must have the shape .* \(3, 6\), got \(2, 6\)"):
        obs.refit(weight, bias, mask, gram, dense_weight=weight[:2])
    with pytest.raises(ValueError, match=r"'dense_bias' was given without 'dense_weight'"):
        obs.refit(weight, bias, mask, gram, dense_bias=bias)
    with pytest.raises(ValueError, match=r"'ridge' must be .*got -0.5"):
        obs.refit(weight, bias, mask, gram, ridge=-0.5)
    with pytest.raises(ValueError, match=r"singular with ridge=0"):
        obs.refit(weight, bias, mask, torch.zeros(7, 7, dtype=F64), ridge=0.0)
    with pytest.raises(ValueError, match=r"'new_weight' must have the shape of 'weight'"):
        obs.reconstruction_error(weight, bias, weight[:, :5], bias, gram)


# ------------------------------------------------------------------ 8. dtypes


def test_float32_in_float32_out_and_no_bias_means_zero_bias():
    weight, bias, _, _, gram = _problem(5, 16, seed=19)
    w32, b32, g32 = weight.float(), bias.float(), gram.float()
    for dtype in (torch.float64, torch.float32):
        result = obs.obs_sweep(w32, b32, g32, sparsity=0.5, dtype=dtype)
        assert result.weight.dtype == torch.float32 and result.bias.dtype == torch.float32
        new_weight, new_bias = obs.refit(w32, b32, result.mask, g32, dtype=dtype)
        assert new_weight.dtype == torch.float32 and new_bias.dtype == torch.float32
    reference = obs.obs_sweep(weight, bias, gram, sparsity=0.5)
    torch.testing.assert_close(result.weight.double(), reference.weight, rtol=1e-3, atol=1e-3)
    no_bias = obs.obs_sweep(w32, None, g32, sparsity=0.5)
    zero_bias = obs.obs_sweep(w32, torch.zeros(5), g32, sparsity=0.5)
    torch.testing.assert_close(no_bias.weight, zero_bias.weight)
    assert no_bias.bias.dtype == torch.float32


# ------------------------------------------------------------------ 9. a shared factor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_precomputed_factor_and_a_skipped_error_change_nothing_else(dtype):
    """Sweeps of one Gram matrix may share its inverse factor: the results are the same, bit for bit."""
    weight, bias, _, _, gram = _problem(6, 16, seed=23, dead=(3,))
    factor = obs.inverse_factor(gram, damp=0.05, dtype=dtype)
    for kwargs in ({"sparsity": 0.5, "budget": "layer"}, {"pattern": (2, 4)}, {"sparsity": 0.25, "pattern": "row"}):
        plain = obs.obs_sweep(weight, bias, gram, damp=0.05, dtype=dtype, block_size=8, **kwargs)
        shared = obs.obs_sweep(
            weight, bias, gram, damp=0.05, dtype=dtype, block_size=8, factor=factor, measure_error=False, **kwargs
        )
        assert torch.equal(shared.mask, plain.mask)
        assert torch.equal(shared.weight, plain.weight) and torch.equal(shared.bias, plain.bias)
        assert math.isnan(shared.error) and plain.error >= 0
        without_gram = obs.obs_sweep(weight, bias, None, damp=0.05, dtype=dtype, block_size=8, factor=factor, **kwargs)
        assert torch.equal(without_gram.weight, plain.weight) and math.isnan(without_gram.error)
    cut = obs.InverseFactor(factor.upper[:16, :16], factor.dead[:16], 0.05)
    with pytest.raises(ValueError, match=r"argument 'factor' must have shape \(17, 17\)"):
        obs.obs_sweep(weight, bias, gram, 0.5, damp=0.05, factor=cut)
    with pytest.raises(ValueError, match=r"made with damp=0.05, but the sweep asks for damp=0.01"):
        obs.obs_sweep(weight, bias, gram, 0.5, factor=factor)
    with pytest.raises(TypeError, match=r"argument 'factor' must be an InverseFactor"):
        obs.obs_sweep(weight, bias, gram, 0.5, damp=0.05, factor=factor.upper)
    with pytest.raises(ValueError, match=r"argument 'gram' must be a Gram matrix when no 'factor' is given"):
        obs.obs_sweep(weight, bias, None, 0.5)
    with pytest.raises(ValueError, match=r"singular after dampening with damp=0"):
        obs.inverse_factor(torch.zeros(4, 4, dtype=F64), damp=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_factor_made_from_a_matrix_handed_over_is_the_same_and_frees_it(dtype):
    """A Gram matrix handed over in a list is dampened in place and let go: the factor is the same."""
    *_, gram = _problem(6, 16, seed=31, dead=(2, 5))
    expected_gram = gram.clone()
    expected = obs.inverse_factor(gram, damp=0.05, dtype=dtype)
    assert torch.equal(gram, expected_gram)  # a matrix not handed over is left as it was
    holder = [gram.clone()]
    watch = weakref.ref(holder[0])
    factor = obs.inverse_factor(holder, damp=0.05, dtype=dtype)
    assert holder == [] and watch() is None
    assert torch.equal(factor.upper, expected.upper) and torch.equal(factor.dead, expected.dead)
    assert factor.dead.tolist() == [i in (2, 5) for i in range(17)]
    with pytest.raises(ValueError, match=r"argument 'gram' given as a list must hold exactly one matrix, got 2"):
        obs.inverse_factor([gram, gram])
    refused = [gram]
    with pytest.raises(ValueError, match=r"argument 'damp'"):
        obs.inverse_factor(refused, damp=-1.0)
    assert refused == [gram] and torch.equal(refused[0], expected_gram)  # refused: still the caller's, unchanged


@pytest.mark.parametrize("batch", [(), (3,)])
def test_cholesky_in_place_is_the_copying_factorisation_bit_for_bit(batch):
    """A symmetric row-major matrix (or batch) and a column-major one are factored where they lie, into
    the bits and strides a copy gets; any other matrix is factored from a copy and left unchanged."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(*batch, 70, 23, generator=g, dtype=F64)
    symmetric = x.mT @ x + torch.eye(23, dtype=F64)
    symmetric = (symmetric + symmetric.mT) / 2  # exactly symmetric
    for upper in (False, True):
        expected, expected_info = torch.linalg.cholesky_ex(symmetric, upper=upper)
        for matrix in (symmetric.clone(), symmetric.mT.clone().mT):  # row-major, column-major
            factor, info = obs._cholesky_in_place(matrix, upper=upper)
            assert factor.untyped_storage().data_ptr() == matrix.untyped_storage().data_ptr()
            assert torch.equal(factor, expected) and factor.stride() == expected.stride()
            assert torch.equal(info, expected_info)
    skewed = symmetric.clone()
    skewed[..., 0, 1] += 1e-3  # not symmetric: LAPACK reads the lower triangle, as from a copy
    original = skewed.clone()
    factor, _ = obs._cholesky_in_place(skewed)
    assert factor.untyped_storage().data_ptr() != skewed.untyped_storage().data_ptr()
    assert torch.equal(factor, torch.linalg.cholesky_ex(original)[0]) and torch.equal(skewed, original)


def test_the_inverse_factor_is_made_in_the_memory_of_the_matrix_handed_over():
    """No second (in + 1)^2 matrix: the handed-over Gram matrix becomes U of H^-1, equal to the chain of
    copying factorisations."""
    *_, gram = _problem(6, 16, seed=37, dead=(3,))
    gram = (gram + gram.mT) / 2
    damped = obs.dampen(gram, 0.01)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    holder = [gram.clone()]
    storage = holder[0].untyped_storage().data_ptr()
    factor = obs.inverse_factor(holder, damp=0.01)
    assert factor.upper.untyped_storage().data_ptr() == storage
    assert torch.equal(factor.upper, expected)


def test_parameters_and_grad_tracking_inputs_are_solved_as_values():
    """The solver is not differentiable: an nn.Parameter weight or a Gram matrix that requires grad gives
    the results of their detached values (the sweep failed inside autograd, the factorisations in place
    refused to write)."""
    weight, bias, _, _, gram = _problem(5, 12, seed=43)
    gram = (gram + gram.mT) / 2
    mask = _random_mask(5, 12, seed=43)
    tracked = dict(
        weight=torch.nn.Parameter(weight.clone()),
        bias=torch.nn.Parameter(bias.clone()),
        gram=gram.clone().requires_grad_(),
    )
    expected_sweep = obs.obs_sweep(weight, bias, gram, 0.5)
    sweep = obs.obs_sweep(tracked["weight"], tracked["bias"], tracked["gram"], 0.5)
    assert torch.equal(sweep.weight, expected_sweep.weight) and torch.equal(sweep.mask, expected_sweep.mask)
    expected_refit = obs.refit(weight, bias, mask, gram)
    refitted = obs.refit(tracked["weight"], tracked["bias"], mask, tracked["gram"])
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(refitted, expected_refit, strict=True))
    factor = obs.inverse_factor(tracked["gram"])
    assert torch.equal(factor.upper, obs.inverse_factor(gram).upper) and not factor.upper.requires_grad
    assert torch.equal(tracked["weight"], weight) and torch.equal(tracked["gram"], gram)  # inputs untouched


@pytest.mark.parametrize("pattern,budget", [("row", "block"), ("unstructured", "block"), ("unstructured", "layer")])
def test_a_sparsity_below_one_never_sweeps_a_row_or_block_empty(pattern, budget):
    """round(0.99 * 10) = 10 emptied every row of a 10-input layer, round(0.995 * 48) = 48 a whole layer."""
    for out, n_in, sparsity in ((24, 10, 0.99), (2, 24, 0.995)):
        weight, bias, _, _, gram = _problem(out, n_in, seed=47)
        result = obs.obs_sweep(weight, bias, gram, sparsity, pattern=pattern, budget=budget)
        left = result.mask.sum(dim=1) if pattern == "row" else result.mask.sum()
        assert bool((left >= 1).all())
        kept = out * (n_in - round(sparsity * n_in)) if pattern == "row" else out * n_in - round(sparsity * out * n_in)
        assert int(result.mask.sum()) == max(kept, out if pattern == "row" else 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padded_systems_solved_in_pieces_give_the_whole_chunks_bits(monkeypatch, dtype):
    """Pieces of whole lines keep each system at its offset modulo 64 bytes in the chunk's batch, so LAPACK
    rounds alike; pieces too small for a line are solved alike up to rounding."""
    g = torch.Generator().manual_seed(29)
    out, n_in = 90, 40
    x = torch.randn(120, n_in, generator=g, dtype=F64)
    gram = _gram(x)
    weight, bias = torch.randn(out, n_in, generator=g, dtype=F64), torch.randn(out, generator=g, dtype=F64)
    mask = torch.rand(out, n_in, generator=g, dtype=F64) < torch.rand(out, 1, generator=g, dtype=F64)  # uneven rows
    monkeypatch.setattr(obs, "_MAX_PIECE_ENTRIES", 1 << 30)
    whole = obs.refit(weight, bias, mask, gram, dtype=dtype)
    widest = int(mask.sum(dim=1).max()) + 1  # the bias is always kept
    for entries in (16 * widest**2, 32 * widest**2):  # whole lines of rows fit in a piece: the same bits
        monkeypatch.setattr(obs, "_MAX_PIECE_ENTRIES", entries)
        pieces = obs.refit(weight, bias, mask, gram, dtype=dtype)
        assert torch.equal(pieces[0], whole[0]) and torch.equal(pieces[1], whole[1])
    monkeypatch.setattr(obs, "_MAX_PIECE_ENTRIES", 1)  # one system at a time: the same to rounding
    pieces = obs.refit(weight, bias, mask, gram, dtype=dtype)
    torch.testing.assert_close(pieces, whole, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)
    assert obs._piece_rows(1 << 18, 41, 8) % 8 == 0 and obs._piece_rows(1 << 18, 41, 4) % 16 == 0
    assert obs._piece_rows(1, 64, 8) == 1 and obs._piece_rows(1 << 18, 64, 8) == 64
    assert obs._piece_rows(3 * 41**2, 41, 8) == 3  # fewer than a line of 8 rows: memory first
    assert obs._piece_rows(1 << 18, 785, 8) == 1  # one system of 785 is above the budget: one at a time


@pytest.mark.parametrize("seed", range(6))
def test_the_smallest_entries_are_those_topk_selects_ties_included(seed):
    """The layer budget's ranking asks for the entries that stay where most go: the same set as
    ``topk`` of the smallest, with ties across the boundary left to ``topk`` itself."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(30, 40, generator=g, dtype=F64)
    if seed % 2:
        scores = scores.round(decimals=0)  # few distinct values: ties at every boundary
    scores[0, :5] = -math.inf  # dead inputs
    for count in (0, 1, 600, 1000, 1080, 1199, 1200):
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        if count:
            expected[torch.topk(scores.flatten(), count, largest=False, sorted=False).indices] = True
        assert torch.equal(obs._smallest_mask(scores, count), expected.view_as(scores)), count


def test_a_float32_solve_that_rounding_makes_singular_says_to_compute_in_float64():
    """In float32 a large common offset leaves the spread of the inputs below the rounding of ``H``: the
    sweep is refused with the two ways out, where float64 solves it."""
    g = torch.Generator().manual_seed(3)
    x = 1000.0 + torch.randn(512, 128, generator=g, dtype=F64)
    gram, weight = _gram(x), torch.randn(4, 128, generator=g, dtype=F64)
    with pytest.raises(ValueError, match=r"singular after dampening.*torch\.float32.*compute in float64"):
        obs.obs_sweep(weight, None, gram, sparsity=0.5, dtype=torch.float32)
    assert obs.obs_sweep(weight, None, gram, sparsity=0.5).mask.sum() == 4 * 64
