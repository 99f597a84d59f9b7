"""Replaying layer outputs: served only for an identical input to unchanged parameters, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ecp_fast
from ecp_fast.pruning import obs, reconstruction
from ecp_fast.pruning.replay import CacheBudget, OutputReplay, replayable


class _Subclass(nn.Linear):
    """A Linear subclass: its forward may do anything, so it is not replayed."""


def _linear(fan_in: int = 5, fan_out: int = 3) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(fan_in, fan_out).double()


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the Linear computations that really run (``F.linear`` calls)."""
    counted: list[int] = []
    linear = torch.nn.functional.linear

    def counting(*args: object) -> torch.Tensor:
        counted.append(1)
        return linear(*args)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    return counted


def test_an_identical_call_is_replayed_and_a_changed_input_or_weight_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, replay = _linear(), OutputReplay()
    replay.install([layer])
    linear = torch.nn.functional.linear  # the uncounted op, for the expected values
    real = _calls(monkeypatch)
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        again = layer(x.clone())  # equal values, another tensor
        assert len(real) == 1 and torch.equal(again, first) and again is not first
        again.add_(1.0)  # the caller may change what it was given; the kept copy is unaffected
        assert torch.equal(layer(x), first) and len(real) == 1
        layer(x + 1e-12)
        assert len(real) == 2
        layer.weight.mul_(2.0)  # in place: a new version
        assert torch.equal(layer(x), linear(x, layer.weight, layer.bias)) and len(real) == 3
        layer.bias = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # a new tensor
        assert torch.equal(layer(x), linear(x, layer.weight, layer.bias)) and len(real) == 4
        x.mul_(3.0)  # the kept input changed in place: never matched again
        layer(x)
        assert len(real) == 5
    replay.remove()


def test_calls_with_autograd_are_not_served_and_remove_restores_the_forward() -> None:
    layer, replay = _linear(), OutputReplay()
    replay.install([layer])
    x = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    assert layer(x).requires_grad  # with autograd: computed, with its graph
    with torch.inference_mode():  # inference tensors have no version to check: computed
        ones = torch.ones(2, 5, dtype=torch.float64)
        assert torch.equal(layer(ones), torch.nn.functional.linear(ones, layer.weight, layer.bias))
    with torch.no_grad():  # a sparse input: computed, never kept
        sparse = x.to_sparse()
        assert torch.equal(layer(sparse), torch.nn.functional.linear(sparse, layer.weight, layer.bias))
    assert len(replay.entries[layer]) == 1  # only the strided call of the start
    assert "forward" in layer.__dict__
    replay.remove()
    assert "forward" not in layer.__dict__ and not replay.entries


def test_only_plain_linear_and_conv_layers_are_replayable_and_the_budget_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert replayable(nn.Linear(2, 2)) and replayable(nn.Conv2d(1, 2, 3))
    assert not replayable(_Subclass(2, 2)) and not replayable(nn.Conv1d(1, 2, 3)) and not replayable(nn.ReLU())
    patched = nn.Linear(2, 2)
    patched.forward = lambda inputs: inputs  # someone else's forward: left alone
    assert not replayable(patched)
    layer, replay = _linear(), OutputReplay(budget=0)
    replay.install([layer])
    real = _calls(monkeypatch)
    x = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(real) == 2 and replay.used == 0
    replay.remove()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _pruned(model: nn.Module, method: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """State and candidate divergences after pruning ``model`` to 70% with ``method``."""
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.rand(32, 12, generator=generator), torch.randint(0, 3, (32,), generator=generator)) for _ in range(3)
    ]
    report = ecp_fast.prune(model, batches, sparsity=0.7, method=method, progress=False)
    return {key: value.clone() for key, value in model.state_dict().items()}, report.divergences


def _plain_sweep(weight, bias, quadratic, plan, run, shared):
    """The sweep of a layer with nothing kept between allocation candidates."""
    config = run.config
    return obs.obs_sweep(
        weight,
        bias,
        quadratic()[0],
        plan.sparsity,
        pattern=plan.pattern,
        block_size=config.block_size,
        damp=config.damp,
        budget=config.budget,
    )


@pytest.mark.parametrize("method", ["ecp-obs", "sparsegpt"])
def test_reconstruction_gives_the_same_bits_without_replay_and_kept_sweeps(method: str, monkeypatch) -> None:
    """Replayed outputs, kept dense inputs and reference outputs, and the first layer's kept factor and
    sweeps change no bit of the result."""
    computed = _calls(monkeypatch)
    cached = _pruned(_mlp(), method)
    with_replay = len(computed)
    monkeypatch.setattr(reconstruction, "cache_budget", lambda specs, grams=None: 0)  # nothing kept
    monkeypatch.setattr(reconstruction, "_sweep_layer", _plain_sweep)
    computed.clear()
    plain = _pruned(_mlp(), method)
    if method == "ecp-obs":  # an allocation search: later passes replay the layers pruned before
        assert with_replay < len(computed)
    assert cached[1] == plain[1]
    for key, value in cached[0].items():
        assert torch.equal(value, plain[0][key]), key


def test_a_shared_budget_counts_every_cache_and_the_replay_gives_way_to_a_cache_that_evicts() -> None:
    """Caches sharing one :class:`CacheBudget` stay within it together; a ``take`` with ``evict`` makes the
    replay drop its latest outputs for room, and what a cache drops or releases is given back."""
    layer = _linear(5, 4)
    x = [torch.randn(3, 5, dtype=torch.float64) for _ in range(3)]
    one = 3 * 4 * 8  # one output; the inputs are resident
    budget = CacheBudget(3 * one, resident={tensor.untyped_storage().data_ptr() for tensor in x})
    replay = OutputReplay(budget)
    replay.install([layer])
    with torch.no_grad():
        for tensor in x:
            layer(tensor)
    assert replay.used == budget.used == 3 * one and len(replay.entries[layer]) == 3
    assert not budget.take(one)  # full: nothing reserved
    assert budget.take(one + 1, evict=True) and budget.used == one + 1 + one  # two outputs dropped for it
    kept = replay.entries[layer]
    assert len(kept) == 1 and torch.equal(kept[0].inputs, x[0])  # the latest went first
    assert not budget.take(4 * one, evict=True)  # more than the whole budget: nothing dropped for it
    assert len(replay.entries[layer]) == 1
    replay.remove()
    assert budget.used == one + 1 and budget.yielding == []


def test_a_shared_budget_takes_no_second_list_of_resident_storages() -> None:
    budget = CacheBudget(100)
    assert OutputReplay(budget).budget is budget and CacheBudget.of(7).limit == 7
    with pytest.raises(ValueError, match=r"argument 'resident' belongs to the shared CacheBudget"):
        OutputReplay(budget, resident={1})
