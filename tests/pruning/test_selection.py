"""Selection picks exactly the weights ``torch.topk`` would, by a faster route where the set is unique."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ecp_fast.pruning.selection import Scope, _top, select_weights, target_count

VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e-300, float("inf"), float("-inf"), float("nan")])


def topk_mask(values: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    mask = torch.zeros(values.shape, dtype=torch.bool)
    mask[torch.topk(values, count, largest=largest, sorted=False).indices] = True
    return mask


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(VALUES, st.floats(-3, 3)), min_size=1, max_size=40), st.integers(1, 40), st.booleans())
@example([1.0, 1.0, float("nan")], 2, True)  # the threshold's ties alone would make up the count
@example([float("nan"), 0.0, 0.0, float("-inf")], 3, False)
def test_the_chosen_set_is_the_one_topk_chooses(values, count, largest):
    tensor = torch.tensor(values, dtype=torch.float64)
    count = min(count, len(values))
    chosen = _top(tensor, count, largest)
    assert int(chosen.sum()) == count
    assert torch.equal(chosen, topk_mask(tensor, count, largest))


def test_large_vectors_with_and_without_ties():
    torch.manual_seed(0)
    distinct = torch.rand(100_000, dtype=torch.float64)
    tied = torch.randint(0, 50, (100_000,)).double()
    for values in (distinct, tied):
        for count in (1, 10_000, 50_000, 99_999):
            for largest in (True, False):
                chosen = _top(values, count, largest)
                assert int(chosen.sum()) == count
                if values is distinct:  # a unique answer: both routes agree exactly
                    assert torch.equal(chosen, topk_mask(values, count, largest))
                else:  # ties at the threshold: any count of them is a valid choice
                    threshold = values[chosen].min() if largest else values[chosen].max()
                    others = values[~chosen]
                    assert bool((others <= threshold).all() if largest else (others >= threshold).all())


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
def test_global_selection_removes_the_smallest_scores(sparsity):
    torch.manual_seed(1)
    scores = {"a": torch.rand(30, 40, dtype=torch.float64), "b": torch.rand(20, 30, dtype=torch.float64)}
    keep = {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
    keep["a"][0, :7] = False  # already removed: counts toward the target, never chosen again
    removed = select_weights(scores, keep, sparsity, Scope("global"))
    flat = torch.cat([scores[name][keep[name]] for name in scores])
    chosen = torch.cat([scores[name][removed[name]] for name in scores])
    assert not bool(removed["a"][0, :7].any())
    assert chosen.numel() == round(sparsity * 1800) - 7
    if chosen.numel():
        survivors = torch.cat([scores[name][keep[name] & ~removed[name]] for name in scores])
        assert chosen.max() < survivors.min()
    assert flat.numel() == 1793


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.floats(0.0, 1.0, exclude_max=True))
def test_a_sparsity_below_one_keeps_at_least_one_weight_of_its_scope(total, sparsity):
    """The nearest count, except where rounding would remove every weight of a scope that was asked to keep some."""
    count = target_count(total, sparsity)
    assert 0 <= count <= max(total - 1, 0)
    assert count == round(sparsity * total) or (count == total - 1 and round(sparsity * total) == total)


@pytest.mark.parametrize("kind", ["row", "layer"])
def test_row_and_layer_scopes_at_high_sparsity_leave_every_row_or_layer_a_weight(kind):
    """round(0.99 * 10) = 10 emptied every row (and a 48-weight layer): a constant model for sparsity 0.99."""
    torch.manual_seed(2)
    scores = {"a": torch.rand(24, 10, dtype=torch.float64), "b": torch.rand(2, 24, dtype=torch.float64)}
    keep = {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
    removed = select_weights(scores, keep, 0.99, Scope(kind))
    for name, score in scores.items():
        left = (~removed[name]).sum(dim=1) if kind == "row" else (~removed[name]).sum()
        size = score.shape[1] if kind == "row" else score.numel()
        assert bool((left == size - target_count(size, 0.99)).all()) and bool((left >= 1).all()), name
    assert int((~removed["b"]).sum()) == (2 if kind == "row" else 1)  # 48 weights: round(47.52) would take all


def test_numpy_numbers_are_sparsities_and_bools_are_not():
    import numpy as np

    from ecp_fast.pruning.selection import resolve_sparsity

    for value in (np.float32(0.25), np.float64(0.25), 0.25, np.int64(0)):
        assert resolve_sparsity(value, Scope("global")) == float(value)
    for value in (True, np.bool_(False), "0.5", torch.tensor(0.5)):
        with pytest.raises(TypeError, match=r"argument 'sparsity' must be a float in \[0, 1\) or None"):
            resolve_sparsity(value, Scope("global"))
