"""model_transaction: every kind of change a call can make is undone exactly when the call fails."""

from __future__ import annotations

import warnings

import pytest
import torch
from fingerprint import assert_unchanged, diff_fingerprints, fingerprint
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ecp_fast.pruning.transaction import ModelSnapshot, model_transaction


class Boom(Exception):
    """The failure the tests inject."""


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()


def x(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Double(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def _old_weight_norm(module: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(module)


# Each change takes the model and does something a pruning call might do (or worse).
CHANGES = {
    "write values": lambda m: m[0].weight.data.mul_(0.5),
    "write buffer": lambda m: m[1].running_mean.add_(1.0),
    "add bias": lambda m: setattr(m[3], "bias", nn.Parameter(torch.ones(3, dtype=torch.float64))),
    "drop bias": lambda m: m[0].register_parameter("bias", None),
    "mask": lambda m: torch_prune.custom_from_mask(m[0], "weight", (torch.rand(6, 4) > 0.5).double()),
    "mask again": lambda m: torch_prune.random_unstructured(m[0], "weight", amount=0.5),
    "remove mask": lambda m: torch_prune.remove(m[0], "weight") if hasattr(m[0], "weight_mask") else None,
    "parametrize": lambda m: parametrize.register_parametrization(m[3], "weight", Double()),
    "unparametrize": lambda m: (
        parametrize.remove_parametrizations(m[3], "weight") if parametrize.is_parametrized(m[3]) else None
    ),
    "old weight_norm": lambda m: _old_weight_norm(m[0]) if not parametrize.is_parametrized(m[0]) else None,
    "forward hook": lambda m: m[2].register_forward_hook(lambda *a: None),
    "pre hook": lambda m: m.register_forward_pre_hook(lambda *a: None),
    "backward hook": lambda m: m[0].register_full_backward_hook(lambda *a: None),
    "state dict hook": lambda m: m[3]._register_state_dict_hook(lambda *a: None),
    "train flag": lambda m: m.train(not m.training),
    "replace layer": lambda m: m.__setitem__(3, nn.Linear(6, 3).double()),
    "add layer": lambda m: m.append(nn.Identity()),
    "delete layer": lambda m: m.__delitem__(2),
    "forward in train": lambda m: m.train()(x()).sum().backward(),
    "new buffer": lambda m: m[2].register_buffer("extra", torch.zeros(2)),
    "to float": lambda m: m.float(),
    "requires_grad": lambda m: m[0].weight.requires_grad_(False) if m[0].weight.is_leaf else None,
    "attribute": lambda m: setattr(m[1], "eps", 0.5),
}


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x())


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_change_is_undone(change: str) -> None:
    model = net()
    model[1].train()
    if change == "remove mask":
        torch_prune.l1_unstructured(model[0], "weight", amount=0.25)
    if change == "unparametrize":
        parametrize.register_parametrization(model[3], "weight", Double())
    before = fingerprint(model)
    with pytest.raises(Boom):
        with model_transaction(model):
            CHANGES[change](model)
            assert diff_fingerprints(before, fingerprint(model)), f"{change!r} changed nothing"
            raise Boom
    assert_unchanged(before, model)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(sorted(CHANGES)), min_size=1, max_size=6), st.booleans(), st.booleans())
def test_any_sequence_of_changes_is_undone(changes: list[str], premasked: bool, interrupt: bool) -> None:
    model = net()
    if premasked:
        torch_prune.l1_unstructured(model[0], "weight", amount=0.25)
        parametrize.register_parametrization(model[3], "weight", Double())
    reference = output(model).clone()
    model[1].train()
    before = fingerprint(model)
    failure = KeyboardInterrupt if interrupt else Boom
    with pytest.raises(failure):
        with model_transaction(model):
            for change in changes:
                try:
                    CHANGES[change](model)
                except Exception:  # noqa: BLE001
                    pass  # a change that does not apply to the model as it now is
            raise failure
    assert_unchanged(before, model)
    assert torch.equal(output(model), reference)


def test_success_keeps_the_changes() -> None:
    model = net()
    with model_transaction(model):
        torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    assert hasattr(model[0], "weight_mask")


def test_optimizer_keeps_working_after_a_rollback() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Boom):
        with model_transaction(model):
            torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
            model[3].bias = nn.Parameter(torch.zeros(3, dtype=torch.float64))
            raise Boom
    weight = model[0].weight.detach().clone()
    model.train()(x()).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, weight)
    assert {id(p) for p in model.parameters()} == {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_held_hook_handles_stay_valid() -> None:
    model = net()
    calls: list[int] = []
    handle = model[0].register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(Boom):
        with model_transaction(model):
            handle.remove()
            model[0].register_forward_hook(lambda *args: calls.append(2))
            raise Boom
    output(model)
    assert calls == [1]
    handle.remove()
    output(model)
    assert calls == [1]


def test_gradients_and_tied_weights_are_restored() -> None:
    model = net()
    tied = nn.Linear(6, 3, bias=False).double()
    tied.weight = model[3].weight
    model.append(tied)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = fingerprint(model)
    with pytest.raises(Boom):
        with model_transaction(model):
            model[0].weight.grad.mul_(3)
            model[3].weight.grad = torch.ones_like(model[3].weight)
            tied.weight.data.zero_()
            raise Boom
    assert_unchanged(before, model)
    assert model[-1].weight is model[3].weight


def test_on_rollback_runs_last_first_and_only_on_failure() -> None:
    model = net()
    calls: list[str] = []
    with model_transaction(model) as transaction:
        transaction.on_rollback(lambda: calls.append("never"))
    assert calls == []
    with pytest.raises(Boom):
        with model_transaction(model) as transaction:
            transaction.on_rollback(lambda: calls.append("first"))
            transaction.on_rollback(lambda: calls.append("second"))
            raise Boom
    assert calls == ["second", "first"]


def test_a_failing_undo_is_reported_and_the_original_error_raised() -> None:
    model = net()
    before = fingerprint(model)

    def broken_undo() -> None:
        raise OSError("disk full")

    with pytest.raises(Boom) as info:
        with model_transaction(model) as transaction:
            transaction.on_rollback(broken_undo)
            model[0].weight.data.zero_()
            raise Boom
    assert any("disk full" in note for note in getattr(info.value, "__notes__", []))
    assert_unchanged(before, model)


def test_extra_modules_and_cpu_storage() -> None:
    model, other = net(), net(seed=3)
    before = fingerprint(model, other)
    with pytest.raises(Boom):
        with model_transaction(model, other, storage="cpu"):
            other[0].weight.data.zero_()
            model[1].train()
            raise Boom
    assert_unchanged(before, model, other)


def test_structure_only_snapshot_does_not_copy_values() -> None:
    model = net()
    snapshot = ModelSnapshot([model], values=False)
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    model[0].weight_orig.data.zero_()
    snapshot.restore()
    assert not hasattr(model[0], "weight_mask") and isinstance(model[0].weight, nn.Parameter)
    assert not model[0].weight.any()


def test_rejects_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="argument 'model' must be an nn.Module, got dict"):
        model_transaction({})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'extra_modules'.*got int at position 0"):
        model_transaction(net(), 3)  # type: ignore[arg-type]
    with model_transaction(net()) as transaction, pytest.raises(TypeError, match="'undo' must be callable"):
        transaction.on_rollback("not callable")  # type: ignore[arg-type]


def test_parametrized_layers_come_back_with_their_values_and_hooks() -> None:
    """weight_norm in both styles: values changed, parametrizations removed, masks added elsewhere."""
    model = net()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    _old_weight_norm(model[3])
    reference = output(model).clone()
    before = fingerprint(model)
    with pytest.raises(KeyboardInterrupt):
        with model_transaction(model):
            model[0].parametrizations.weight.original0.data.mul_(3.0)
            parametrize.remove_parametrizations(model[0], "weight")
            torch.nn.utils.remove_weight_norm(model[3])
            torch_prune.l1_unstructured(model[3], "weight", amount=0.5)
            model.train()(x()).sum().backward()
            raise KeyboardInterrupt
    assert_unchanged(before, model)
    assert parametrize.is_parametrized(model[0], "weight") and hasattr(model[3], "weight_g")
    assert torch.equal(output(model), reference)


def test_lazy_modules_are_recorded_without_values() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh())
    with pytest.raises(Boom):
        with model_transaction(model):
            model[1].register_forward_hook(lambda *args: None)
            raise Boom
    assert not model[1]._forward_hooks
