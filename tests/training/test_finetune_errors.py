"""finetune and fit_classifier: bad arguments are refused before training, failures restore the model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pruning.fingerprint import assert_unchanged, failing_after, fingerprint
from torch import nn

from ecp_fast.pruning.masks import install_mask
from ecp_fast.training.finetune import finetune, fit_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(1))
BATCHES = [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 24, 8)]


class Boom(Exception):
    """The failure the tests inject."""


def model() -> nn.Sequential:
    """A small classifier with a mask, a BatchNorm (its running stats change in training) and eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    install_mask(net[0], (torch.rand(8, 6) > 0.5).float())
    return net.eval()


def generator() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from BATCHES


BAD: dict[str, list[Any]] = {
    "epochs": [0, -1, 1.5, True, "2", None],
    "steps": [0, -3, 2.5, "x"],
    "lr": [0, -1.0, float("nan"), float("inf"), "0.1", None],
    "optimizer": ["rmsprop", None, 3],
    "loss_fn": [None, 3],
    "progress": ["yes", None, 1],
    "batches": [None, "abc", X, 5, [], [X], [(X,)], [(X, Y, Y)], {"a": 1}],
}


@settings(max_examples=60, deadline=None)
@given(
    bad=st.lists(st.sampled_from(sorted(BAD)), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: st.sampled_from(BAD[name]) for name in names})
    ),
    steps=st.sampled_from([None, 2]),
)
def test_bad_arguments_are_refused_before_training(bad: dict[str, Any], steps: int | None) -> None:
    net = model()
    before = fingerprint(net)
    arguments: dict[str, Any] = {
        "batches": BATCHES,
        "loss_fn": nn.CrossEntropyLoss(),
        "steps": steps,
        "progress": False,
        **bad,
    }
    with pytest.raises((TypeError, ValueError), match="finetune: argument '"):
        finetune(net, **arguments)
    assert_unchanged(before, net)


def test_one_shot_batches_for_several_epochs_are_refused() -> None:
    net = model()
    before = fingerprint(net)
    with pytest.raises(ValueError, match="one-shot iterator or generator .generator.*not a generator"):
        finetune(net, generator(), nn.CrossEntropyLoss(), epochs=2, progress=False)
    assert_unchanged(before, net)
    assert len(finetune(net, generator(), nn.CrossEntropyLoss(), steps=5, progress=False)) == 5


def test_a_model_without_trainable_parameters_is_refused() -> None:
    net = model().requires_grad_(False)
    with pytest.raises(ValueError, match="parameters that require gradients, got none"):
        finetune(net, BATCHES, nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(TypeError, match="argument 'model' must be an nn.Module, got str"):
        finetune("model", BATCHES, nn.CrossEntropyLoss())  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize("stage", ["loss at step 3", "optimizer step 2", "bad batch", "wrong shape", "first batch"])
def test_failure_while_training_restores_the_model(
    monkeypatch: pytest.MonkeyPatch, stage: str, error: BaseException
) -> None:
    net = model()
    before = fingerprint(net)
    loss_fn: Callable[..., Any] = nn.CrossEntropyLoss()
    batches: list[Any] = list(BATCHES) * 2
    expected: type[BaseException] = type(error)
    if stage == "loss at step 3":
        loss_fn = failing_after(2, loss_fn, error)
    elif stage == "optimizer step 2":
        monkeypatch.setattr(torch.optim.Adam, "step", failing_after(1, torch.optim.Adam.step, error))
    elif stage == "first batch":
        loss_fn = failing_after(0, loss_fn, error)
    else:
        bad = (X[:4],) if stage == "bad batch" else (torch.randn(4, 7), Y[:4])
        batches.insert(3, bad)
        expected = ValueError if stage == "bad batch" else RuntimeError
    with pytest.raises(expected):
        finetune(net, batches, loss_fn, progress=False)
    assert_unchanged(before, net)


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        ({"y": Y[:5]}, ValueError, "'x' and 'y' must hold as many samples, got 24 and 5"),
        ({"x": [1, 2]}, TypeError, "argument 'x' must be a tensor"),
        ({"epochs": -1}, ValueError, "argument 'epochs' must be an integer >= 0, got -1"),
        ({"lr": 0.0}, ValueError, "argument 'lr' must be a finite number in .0.0, inf., got 0.0"),
        ({"batch_size": 0}, ValueError, "argument 'batch_size' must be an integer >= 1, got 0"),
    ],
)
def test_fit_classifier_checks_its_arguments(arguments: dict[str, Any], error: type[Exception], match: str) -> None:
    net = model()
    before = fingerprint(net)
    values = {"x": X, "y": Y, "epochs": 1, "lr": 1e-2, "seed": 0, **arguments}
    with pytest.raises(error, match=match):
        fit_classifier(net, **values)
    assert_unchanged(before, net)


@pytest.mark.parametrize("error", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_fit_classifier_failure_restores(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    net = model()
    before = fingerprint(net)
    monkeypatch.setattr(torch.optim.Adam, "step", failing_after(2, torch.optim.Adam.step, error))
    with pytest.raises(type(error)):
        fit_classifier(net, X, Y, epochs=2, lr=1e-2, seed=0, batch_size=8)
    assert_unchanged(before, net)


def test_finetune_gives_every_submodule_its_own_mode_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    model.train()
    model[1].eval()  # a frozen batch norm among trained layers
    batches = [(torch.randn(32, 8), torch.randint(0, 4, (32,))) for _ in range(2)]
    finetune(model, batches, nn.functional.cross_entropy, progress=False)
    assert [module.training for module in model.modules()] == [True, True, False, True]
