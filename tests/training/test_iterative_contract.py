"""iterative_prune's contract at its edges: optimizer wrappers and schedulers across rollbacks, weights
refused up front, small prune fractions, and the masked weights a returned model shows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pruning.fingerprint import Bits, assert_unchanged, failing_after, fingerprint
from torch import nn

from ecp_fast.training import iterative
from ecp_fast.training.iterative import ECPPruneStep, iterative_prune
from ecp_fast.training.regularize import RelevanceDecay, RelevanceDecayOptimizer, eligible_weights, sparsity

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(256, 10, generator=torch.Generator().manual_seed(0))
Y = ((X[:, 0] + X[:, 1] * X[:, 2]) > 0).long() + (X[:, 3] > 1).long()
BATCHES = [(X[i : i + 64], Y[i : i + 64]) for i in range(0, 256, 64)]
LOSS = nn.functional.cross_entropy


class Boom(Exception):
    """The failure the tests inject."""


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def density_metric(net: nn.Module) -> float:
    """Falls as the network is pruned, whatever the training does."""
    return 1.0 - sparsity(eligible_weights(net))


def exact(state: Any) -> Any:
    """A (nested) state dict with tensors as exact bits, for ==."""
    if isinstance(state, dict):
        return {key: exact(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [exact(value) for value in state]
    return Bits(state) if isinstance(state, torch.Tensor) else state


def train_a_little(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for inputs, targets in BATCHES[:2]:
        optimizer.zero_grad()
        LOSS(net(inputs), targets).backward()
        optimizer.step()


def rolling_back(net: nn.Module, optimizer: Any, **overrides: Any) -> Any:
    """A run whose 70% steps break the bound (density 0.5), so that it rolls back with backoff 0.5."""
    arguments: dict[str, Any] = dict(
        bound=0.5, interval=5, prune_fraction=0.7, backoff=0.5, recovery_intervals=0, max_steps=100, progress=False
    )
    arguments.update(overrides)
    return iterative_prune(net, BATCHES, LOSS, optimizer, arguments.pop("metric_fn", density_metric), **arguments)


# ---- 1. optimizer wrappers: rollbacks and failures ---------------------------------------------------


def test_rollbacks_work_with_the_relevance_decay_optimizer() -> None:
    net = mlp()
    optimizer = RelevanceDecayOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), RelevanceDecay(net))
    result = rolling_back(net, optimizer)
    assert result.rollbacks > 0 and result.met_bound and 0.4 < result.sparsity <= 0.5


def test_a_failure_restores_a_wrapped_optimizer_exactly() -> None:
    net = mlp()
    inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    optimizer = RelevanceDecayOptimizer(inner, RelevanceDecay(net, gamma=1e-3, decay_steps=50))
    train_a_little(net, optimizer)
    before, optimizer_before = fingerprint(net), exact(optimizer.state_dict())
    calls: list[int] = []
    metric = failing_after(8, lambda m: (calls.append(1), density_metric(m))[1], Boom("after a rollback"))
    with pytest.raises(Boom):
        rolling_back(net, optimizer, metric_fn=metric)
    assert len(calls) == 8
    assert_unchanged(before, net)
    assert exact(optimizer.state_dict()) == optimizer_before
    assert set(inner.state) == {p for p in net.parameters() if p.requires_grad}


def test_an_optimizer_checkpoint_can_be_loaded_twice() -> None:
    """torch's load_state_dict keeps the loaded tensors and updates them in place: a copy is loaded."""
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    train_a_little(net, optimizer)
    checkpoint = iterative.optimizer_checkpoint(optimizer)
    saved = exact(optimizer.state_dict())
    for _ in range(2):
        train_a_little(net, optimizer)
        iterative.load_optimizer_state(optimizer, checkpoint)
        assert exact(optimizer.state_dict()) == saved


# ---- 2. and 3. schedulers ------------------------------------------------------------------------------


def test_a_rollback_keeps_the_learning_rate_the_scheduler_set() -> None:
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
    seen: list[tuple[float, float, float]] = []

    def metric(m: nn.Module) -> float:
        lr = optimizer.param_groups[0]["lr"]
        seen.append((lr, scheduler.get_last_lr()[0], 0.1 * 0.8**scheduler.last_epoch))
        return density_metric(m)

    result = rolling_back(net, optimizer, metric_fn=metric, scheduler=scheduler, eval_after_prune=False)
    assert result.rollbacks > 0
    for lr, last_lr, scheduled in seen:
        assert lr == last_lr == pytest.approx(scheduled)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.8 ** (result.total_steps // 5))


def test_the_interval_scheduler_steps_after_the_evaluation() -> None:
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    epochs: list[int] = []
    metric = lambda m: (epochs.append(scheduler.last_epoch), 1.0)[1]  # noqa: E731
    iterative_prune(
        net, BATCHES, LOSS, optimizer, metric, 0.5, interval=5, scheduler=scheduler, max_steps=15,
        eval_after_prune=False, progress=False,
    )  # fmt: skip
    assert epochs == [0, 1, 2] and scheduler.last_epoch == 3


def test_reduce_lr_on_plateau_steps_on_the_metric() -> None:
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
    metrics = iter([0.6, 0.7, 0.7, 0.7, 0.8, 0.8])
    result = iterative_prune(
        net, BATCHES, LOSS, optimizer, lambda m: next(metrics), 0.5, interval=5, scheduler=scheduler, max_steps=30,
        eval_after_prune=False, progress=False,
    )  # fmt: skip
    assert result.total_steps == 30
    # no improvement after the 2nd and 3rd evaluations (0.7, 0.7) and after the 6th (0.8): three halvings
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_reduce_lr_on_plateau_is_refused_per_step_and_warned_about_in_min_mode() -> None:
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = fingerprint(net)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    with pytest.raises(ValueError, match="argument 'scheduler_step' must be 'interval' for a ReduceLROnPlateau"):
        iterative_prune(
            net, BATCHES, LOSS, optimizer, density_metric, 0.5, interval=5, scheduler=plateau, scheduler_step="step"
        )
    assert_unchanged(before, net)
    with pytest.warns(UserWarning, match="mode='min'.*build it with mode='max'"):
        iterative_prune(
            net, BATCHES, LOSS, optimizer, lambda m: 1.0, 0.5, interval=5, max_steps=10, progress=False,
            scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),
        )  # fmt: skip


# ---- 4., 5. and 8. arguments refused before anything changes --------------------------------------------


def test_an_optimizer_over_other_parameters_is_refused() -> None:
    net = mlp()
    before = fingerprint(net)
    foreign = torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="argument 'optimizer' must hold the model's parameters.*got a SGD over 2"):
        iterative_prune(net, BATCHES, LOSS, foreign, density_metric, 0.5, interval=5, progress=False)
    assert_unchanged(before, net)


@pytest.mark.parametrize(
    "kind, reason",
    [("embedding", "Embedding is not supported"), ("grouped", "Conv2d with groups=4 is not supported")],
)
def test_weights_an_ecp_step_cannot_prune_are_refused_before_training(kind: str, reason: str) -> None:
    torch.manual_seed(0)
    if kind == "embedding":
        net = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(32, 3))
        inputs = torch.randint(0, 20, (32, 4))
    else:
        net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        inputs = torch.randn(32, 4, 8, 8)
    batches = [(inputs, (inputs.flatten(1)[:, 0] > 0).long())]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before, evaluations = fingerprint(net), []
    step = ECPPruneStep(batches, loss_fn=LOSS)
    with pytest.raises(
        ValueError, match=f"argument 'weights' must hold weights the ECPPruneStep.*'0.weight'.*{reason}"
    ):
        iterative_prune(
            net, batches, LOSS, optimizer, lambda m: (evaluations.append(1), 1.0)[1], 0.5, interval=5,
            prune_step=step, progress=False,
        )  # fmt: skip
    assert not evaluations and not optimizer.state
    assert_unchanged(before, net)


def test_duplicate_weights_are_refused() -> None:
    net = mlp()
    before = fingerprint(net)
    weights = eligible_weights(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="argument 'weights' must name each weight once, got '0.weight' twice"):
        iterative_prune(net, BATCHES, LOSS, optimizer, density_metric, 0.5, interval=5, weights=weights + weights[:1])
    assert_unchanged(before, net)


# ---- 6. a fraction that rounds to no weight --------------------------------------------------------------


def test_a_fraction_below_one_weight_still_prunes_one_weight_per_step() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # 48 weights: 1% of them rounds to none
    batches = [(inputs[:, :4], (inputs[:, 0] > 0).long()) for inputs, _ in BATCHES]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    result = iterative_prune(
        net, batches, LOSS, optimizer, lambda m: 1.0, 0.5, interval=5,
        prune_fraction=0.01, max_steps=50, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "max_steps" and result.prune_steps == 8
    assert result.sparsity == pytest.approx(8 / 48)
    result = iterative_prune(
        net, batches, LOSS, optimizer, lambda m: 1.0, 0.5, interval=1,
        prune_fraction=0.01, max_steps=1000, progress=False,
    )  # fmt: skip
    # every weight but one: as far as any sparsity below 1 goes
    assert result.stop_reason == "max_sparsity" and result.sparsity == pytest.approx(47 / 48)


# ---- 7. the masked weights a returned model shows ----------------------------------------------------------


def effective_weights_shown(net: nn.Module) -> bool:
    layers = [module for module in net.modules() if hasattr(module, "weight_mask")]
    return bool(layers) and all(torch.equal(m.weight, m.weight_orig * m.weight_mask) for m in layers)


@pytest.mark.parametrize("backoff", [None, 0.5])
def test_the_returned_model_shows_its_masked_weights_without_a_forward_pass(backoff: float | None) -> None:
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    result = rolling_back(net, optimizer, bound=0.4, prune_fraction=0.3, backoff=backoff)
    assert result.met_bound and result.prune_steps > 2 and result.sparsity > 0.5
    assert effective_weights_shown(net)
    net(X[:1])
    iterative.load_checkpoint(net, result.state_dict)
    assert effective_weights_shown(net) and float((net[0].weight == 0).float().mean()) > 0.3


# ---- 9. RelevanceDecay's own argument names ----------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"gamma": -1.0}, "RelevanceDecay: argument 'gamma' must be a finite number in .0.0, inf., got -1.0"),
        ({"gamma": float("inf")}, "RelevanceDecay: argument 'gamma' must be"),
        ({"decay_steps": -1}, "RelevanceDecay: argument 'decay_steps' must be an integer >= 0 or None, got -1"),
        ({"gamma_final": -0.1}, "RelevanceDecay: argument 'gamma_final' must be"),
    ],
)
def test_relevance_decay_names_its_own_arguments(arguments: dict[str, Any], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        RelevanceDecay(mlp(), **arguments)
