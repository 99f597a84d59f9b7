"""Tests of relevance-gated weight decay (ecp_fast.training.regularize)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from ecp_fast.training.regularize import (
    GammaSchedule,
    RelevanceDecay,
    RelevanceDecayOptimizer,
    eligible_weights,
    relevance_penalty,
    sparsity,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def loss_of(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("alpha", [1.0, 0.01])
def test_added_gradient_equals_autograd_of_explicit_penalty(alpha: float) -> None:
    model = small_net()
    loss_of(model).backward()
    loss_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    gamma = 0.3
    decay = RelevanceDecay(model, gamma=gamma, alpha=alpha)
    decay.apply()
    for ref in decay.weights:
        name = ref.qualified_name
        weight = ref.parameter.detach().clone().requires_grad_(True)
        penalty = relevance_penalty(weight, loss_grads[name], gamma, alpha)
        (expected,) = torch.autograd.grad(penalty, weight)
        torch.testing.assert_close(ref.parameter.grad - loss_grads[name], expected)
    # biases are not regularised
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            torch.testing.assert_close(parameter.grad, loss_grads[name])


def test_relevant_weights_shrink_less() -> None:
    weight = nn.Parameter(torch.ones(4))
    weight.grad = torch.tensor([0.0, 0.01, 1.0, 5.0])  # irrelevant ... relevant
    layer = nn.Linear(4, 1, bias=False)
    layer.weight = nn.Parameter(weight.detach().clone().reshape(1, 4))
    layer.weight.grad = weight.grad.reshape(1, 4).clone()
    decay = RelevanceDecay(layer, gamma=0.1, alpha=1.0)
    decay.apply()
    added = (layer.weight.grad - weight.grad.reshape(1, 4)).flatten()
    assert torch.all(added[:-1] > added[1:]), added  # strictly less decay for larger gradients
    torch.testing.assert_close(added[0], torch.tensor(0.2))  # full L2 decay 2 * gamma * w

    # Over many plain SGD steps with the loss gradient held fixed at zero for the irrelevant
    # weight, it decays towards zero while the relevant one keeps its size.
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0]]))
    decay = RelevanceDecay(layer, gamma=0.05, alpha=0.1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        layer.weight.grad = torch.tensor([[0.0, 2.0]])
        decay.apply()
        layer.weight.grad -= torch.tensor([[0.0, 2.0]])  # the loss part is only the gate's input
        optimizer.step()
    irrelevant, relevant = layer.weight.detach().flatten().tolist()
    assert irrelevant < 0.1 and relevant > 0.99


def test_schedule_decays_linearly_and_restarts() -> None:
    schedule = GammaSchedule(1.0, decay_steps=4, gamma_final=0.2)
    values = []
    for _ in range(6):
        values.append(schedule.gamma)
        schedule.step()
    assert values == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    schedule.restart()
    assert schedule.gamma == 1.0
    assert GammaSchedule(0.5).gamma == 0.5  # no decay
    with pytest.raises(ValueError, match="gamma0"):
        GammaSchedule(-1.0)


def test_apply_advances_schedule_and_restart_resets() -> None:
    model = small_net()
    decay = RelevanceDecay(model, gamma=1e-3, decay_steps=10)
    for _ in range(5):
        loss_of(model).backward()
        decay.apply()
        model.zero_grad()
    assert decay.gamma == pytest.approx(5e-4)
    decay.restart()
    assert decay.gamma == pytest.approx(1e-3)
    state = decay.state_dict()
    other = RelevanceDecay(model)
    other.load_state_dict(state)
    assert other.gamma == decay.gamma and other.alpha == decay.alpha


def test_masked_weights_regularise_orig_and_keep_zeros() -> None:
    model = small_net()
    first = model[0]
    prune.l1_unstructured(first, "weight", amount=0.5)
    mask = first.weight_mask.clone()
    decay = RelevanceDecay(model, gamma=0.1, alpha=1.0)
    optimizer = RelevanceDecayOptimizer(torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1), decay)
    for _ in range(20):
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step()
    assert torch.equal(first.weight_mask, mask)
    assert torch.all(first.weight[mask == 0] == 0)
    assert torch.all(first.weight_orig[mask == 0] == 0)  # kept at zero despite momentum / decay
    assert torch.any(first.weight_orig[mask == 1] != 0)
    assert decay.weights[0].is_masked and decay.weights[0].parameter is first.weight_orig


def test_masked_gradient_term_matches_effective_weight() -> None:
    model = small_net()
    prune.random_unstructured(model[2], "weight", amount=0.4)
    loss_of(model).backward()
    grad_before = model[2].weight_orig.grad.clone()
    mask = model[2].weight_mask
    decay = RelevanceDecay(model, gamma=0.2, alpha=0.5)
    decay.apply()
    expected = 2 * 0.2 * torch.exp(-grad_before.abs() / 0.5) * model[2].weight_orig.detach() * mask
    torch.testing.assert_close(model[2].weight_orig.grad - grad_before, expected)
    assert torch.all(model[2].weight_orig.grad[mask == 0] == 0)


def test_eligible_weights_cover_layer_types() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.conv = nn.Conv2d(1, 2, 3)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 2)

    names = [ref.qualified_name for ref in eligible_weights(Net())]
    assert names == [
        "embed.weight",
        "attention.in_proj_weight",
        "attention.out_proj.weight",
        "conv.weight",
        "head.weight",
    ]
    names = [ref.qualified_name for ref in eligible_weights(Net(), exclude=["head"])]
    assert "head.weight" not in names
    kv = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert [ref.name for ref in eligible_weights(kv)][:3] == ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def test_attention_and_embedding_get_decay() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(10, 8)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    tokens = torch.randint(0, 10, (3, 5))
    x = embed(tokens)
    out, _ = attention(x, x, x)
    out.square().mean().backward()
    module = nn.ModuleDict({"embed": embed, "attention": attention})
    before = {name: p.grad.clone() for name, p in module.named_parameters()}
    RelevanceDecay(module, gamma=0.1).apply()
    for name in ("embed.weight", "attention.in_proj_weight", "attention.out_proj.weight"):
        assert not torch.equal(dict(module.named_parameters())[name].grad, before[name]), name
    torch.testing.assert_close(module["attention"].in_proj_bias.grad, before["attention.in_proj_bias"])


def test_sparsity_counts_mask_zeros() -> None:
    model = small_net()
    assert sparsity(eligible_weights(model)) == 0.0
    prune.global_unstructured([(model[0], "weight"), (model[2], "weight")], prune.L1Unstructured, amount=9)
    assert sparsity(eligible_weights(model)) == pytest.approx(9 / 45)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        RelevanceDecay(small_net(), alpha=0.0)
    with pytest.raises(ValueError, match="no eligible"):
        RelevanceDecay(nn.Sequential(nn.ReLU()))


def test_optimizer_wrapper_works_with_lr_schedulers_and_state_dict() -> None:
    model = small_net()
    decay = RelevanceDecay(model, gamma=1e-3, decay_steps=10)
    optimizer = RelevanceDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert decay.schedule.step_count == 3
    state = optimizer.state_dict()
    decay.restart()
    optimizer.load_state_dict(state)
    assert decay.schedule.step_count == 3


def _wrapped(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> RelevanceDecayOptimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer is None else optimizer
    return RelevanceDecayOptimizer(optimizer, RelevanceDecay(model, gamma=0.1))


def test_the_wrapper_copies_and_saves_without_breaking_other_instances(tmp_path) -> None:
    """torch's Optimizer state methods patch ``step`` on the class: a copy used to break every instance."""
    import copy

    model = small_net()
    copied = copy.deepcopy(_wrapped(model))
    torch.save(_wrapped(model), tmp_path / "optimizer.pt")
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    for optimizer in (copied, loaded, _wrapped(model)):
        loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    calls = []
    fresh = _wrapped(model)
    fresh.register_step_pre_hook(lambda *args: calls.append("pre"))
    fresh.register_step_post_hook(lambda *args: calls.append("post"))
    loss_of(model).backward()
    fresh.step()
    assert calls == ["pre", "post"]


def test_a_closure_reaches_the_wrapped_optimizer_and_the_schedule_advances_once() -> None:
    model = small_net()
    optimizer = _wrapped(model, torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3))
    before = loss_of(model).item()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    assert float(optimizer.step(closure)) == pytest.approx(before)
    assert optimizer.decay.schedule.step_count == 1 and loss_of(model).item() < before


def test_a_bad_state_changes_nothing() -> None:
    decay = RelevanceDecay(small_net(), gamma=0.1, alpha=2.0)
    state = decay.state_dict()
    for bad in ({**state, "alpha": -1.0}, {**state, "schedule": {**state["schedule"], "gamma0": -5.0}}):
        with pytest.raises(ValueError):
            decay.load_state_dict(bad)
        assert decay.state_dict() == state
    with pytest.raises(ValueError, match="argument 'state' must be what state_dict"):
        _wrapped(small_net()).load_state_dict(torch.optim.SGD(small_net().parameters(), lr=0.1).state_dict())


def test_a_sparse_embedding_gradient_is_left_alone() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    decay = RelevanceDecay(model, gamma=0.1)
    model(torch.randint(0, 10, (5, 3))).sum().backward()
    decay.apply()
    assert model[0].weight.grad.is_sparse
