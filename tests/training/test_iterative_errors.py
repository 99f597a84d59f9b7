"""iterative_prune and the relevance decay: every argument checked before a mask is installed, and a
run that fails at any stage leaves model, optimizer, scheduler and regulariser as they were."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pruning.fingerprint import Bits, assert_unchanged, failing_after, fingerprint
from torch import nn
from torch.nn.utils import prune as torch_prune

from ecp_fast.training import iterative
from ecp_fast.training.iterative import ECPPruneStep, iterative_prune
from ecp_fast.training.regularize import GammaSchedule, RelevanceDecay, WeightRef, eligible_weights, sparsity

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(48, 10, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()
BATCHES = [(X[i : i + 12], Y[i : i + 12]) for i in range(0, 48, 12)]


class Boom(Exception):
    """The failure the tests inject."""


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 2))


def accuracy(net: nn.Module) -> float:
    with torch.no_grad():
        return 100.0 * float((net(X).argmax(1) == Y).float().mean())


def optimizer_state(optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer's state dict with tensors as exact bits."""
    state = optimizer.state_dict()
    tensors = {
        index: {key: Bits(value) if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    return {"groups": state["param_groups"], "state": tensors}


class Setup:
    """A model mid-training: momentum state, a scheduler, a regulariser, all of which must survive a failure."""

    def __init__(self) -> None:
        self.model = model()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.regularizer = RelevanceDecay(self.model, gamma=1e-3, alpha=1e-2, decay_steps=10)
        for inputs, targets in BATCHES[:2]:
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(inputs), targets).backward()
            self.regularizer.apply()
            self.optimizer.step()
            self.scheduler.step()
        self.before = fingerprint(self.model)
        self.optimizer_before = optimizer_state(self.optimizer)
        self.scheduler_before = self.scheduler.state_dict()
        self.regularizer_before = self.regularizer.state_dict()

    def run(self, **overrides: Any) -> Any:
        arguments: dict[str, Any] = dict(
            batches=BATCHES,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=self.optimizer,
            metric_fn=accuracy,
            bound=0.0,
            interval=2,
            prune_fraction=0.3,
            regularizer=self.regularizer,
            scheduler=self.scheduler,
            warmup_intervals=0,
            max_steps=12,
            progress=False,
        )
        arguments.update(overrides)
        return iterative_prune(self.model, **arguments)

    def assert_unchanged(self) -> None:
        assert_unchanged(self.before, self.model)
        assert optimizer_state(self.optimizer) == self.optimizer_before
        assert self.scheduler.state_dict() == self.scheduler_before
        assert self.regularizer.state_dict() == self.regularizer_before
        # the optimizer still drives the model's own parameters
        parameter = next(self.model.parameters())
        value = parameter.detach().clone()
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.model(X), Y).backward()
        self.optimizer.step()
        assert not torch.equal(parameter, value)


def one_shot() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from BATCHES


BAD: dict[str, list[Any]] = {
    "batches": [None, "data", X, 3, [], [X], [(X,)], one_shot(), iter(BATCHES)],
    "loss_fn": [None, 1],
    "optimizer": [None, "sgd"],
    "metric_fn": [None, 0.5],
    "bound": [float("nan"), float("inf"), "98", None],
    "interval": [0, -1, 1.5, True, None],
    "prune_fraction": [0.0, 1.0, -0.2, float("nan"), "0.2"],
    "prune_step": ["ecp", "l1", 5],
    "regularizer": ["decay", RelevanceDecay(model(seed=3))],
    "scheduler": ["step", 3],
    "scheduler_step": ["epoch", None],
    "weights": [[], ["0.weight"], eligible_weights(model(seed=4))],
    "recovery_intervals": [-1, 0.5],
    "backoff": [0.0, 1.0, 2.0, float("nan")],
    "min_prune_fraction": [0.0, 1.0, None],
    "warmup_intervals": [-1, "1"],
    "max_steps": [0, 1.0e3, None],
    "max_sparsity": [0.0, 1.5, float("nan"), None],
    "time_limit_s": [0, -5.0, "60"],
    "eval_after_prune": [1, None],
    "progress": ["no"],
    "description": [None, 3],
}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from(sorted(BAD)), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: st.sampled_from(BAD[name]) for name in names})
    )
)
def test_bad_arguments_are_refused_before_any_mask(bad: dict[str, Any]) -> None:
    setup = Setup()
    with pytest.raises((TypeError, ValueError), match="argument '|ECPPruneStep"):
        setup.run(**bad)
    setup.assert_unchanged()


def test_max_sparsity_below_the_current_sparsity_is_refused() -> None:
    setup = Setup()
    torch_prune.l1_unstructured(setup.model[0], "weight", amount=0.9)
    setup.before = fingerprint(setup.model)
    current = sparsity(eligible_weights(setup.model))
    with pytest.raises(
        ValueError,
        match=f"'max_sparsity' .0.3. must be above the sparsity the weights already have "
        f".{current:.4g}.; nothing would be pruned",
    ):
        setup.run(max_sparsity=0.3)
    setup.assert_unchanged()


def test_a_regulariser_of_another_model_or_with_broken_settings_is_refused() -> None:
    setup = Setup()
    with pytest.raises(ValueError, match="'regularizer' decays weights that are not in the model"):
        setup.run(regularizer=RelevanceDecay(model(seed=5)))
    setup.regularizer.alpha = -1.0
    with pytest.raises(ValueError, match="'regularizer.alpha' must be a finite number in .0.0, inf., got -1.0"):
        setup.run()
    setup.regularizer.alpha = 1e-2
    setup.assert_unchanged()


def test_a_parametrized_weight_is_refused_by_layer_name() -> None:
    setup = Setup()
    torch.nn.utils.parametrizations.weight_norm(setup.model[2])
    setup.before = fingerprint(setup.model)
    setup.regularizer = RelevanceDecay([ref for ref in eligible_weights(setup.model) if ref.module_name == "0"])
    setup.regularizer_before = setup.regularizer.state_dict()
    with pytest.raises(ValueError, match="layer '2' has a parametrized weight .weight_norm/parametrize"):
        setup.run()
    setup.assert_unchanged()


@settings(max_examples=40, deadline=None)
@given(
    gamma=st.sampled_from([1e-3, -1.0, float("nan"), float("inf"), "1e-3", None]),
    alpha=st.sampled_from([1.0, 0.0, -1.0, float("nan"), "1"]),
    decay_steps=st.sampled_from([None, 10, -1, 2.5, "10"]),
    gamma_final=st.sampled_from([0.0, -1.0, float("inf")]),
    target=st.sampled_from(["model", "weights", "empty", "strings", "tensor"]),
)
def test_relevance_decay_checks_its_arguments(
    gamma: Any, alpha: Any, decay_steps: Any, gamma_final: Any, target: str
) -> None:
    net = model()
    subject = {"model": net, "weights": eligible_weights(net), "empty": [], "strings": ["0.weight"], "tensor": X}[
        target
    ]
    valid = (
        gamma == 1e-3
        and alpha == 1.0
        and decay_steps in (None, 10)
        and gamma_final == 0.0
        and target in ("model", "weights")
    )
    if valid:
        RelevanceDecay(subject, gamma, alpha, decay_steps, gamma_final)
        return
    with pytest.raises((TypeError, ValueError), match="RelevanceDecay|GammaSchedule"):
        RelevanceDecay(subject, gamma, alpha, decay_steps, gamma_final)
    with pytest.raises((TypeError, ValueError)):
        GammaSchedule("x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"batches": []}, "at least one calibration batch"),
        ({"batches": X}, "wrap a single batch in a list"),
        ({"sensitivity": "fisher"}, "'sensitivity' must be one of"),
        ({"sensitivity": "loss", "loss_fn": None}, "needs argument 'loss_fn'"),
        ({"probes": 0}, "'probes' must be an integer >= 1 or None, got 0"),
        ({"method": "l2"}, "'method' must be one of"),
        ({"loss_fn": "ce"}, "'loss_fn' must be callable or None"),
    ],
)
def test_ecp_prune_step_checks_its_arguments(arguments: dict[str, Any], match: str) -> None:
    values = {"batches": BATCHES, "loss_fn": nn.CrossEntropyLoss(), **arguments}
    with pytest.raises((TypeError, ValueError), match=match):
        ECPPruneStep(**values)


def half_prune_then_fail(error: BaseException) -> Callable[..., None]:
    """A prune step that masks the first layer, shifts a bias, and then fails."""

    def prune_step(net: nn.Module, weights: list[WeightRef], target: float) -> None:
        torch_prune.l1_unstructured(weights[0].module, "weight", amount=0.5)
        with torch.no_grad():
            net[2].bias.add_(1.0)
        raise error

    return prune_step


@pytest.mark.parametrize("error", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize(
    "stage",
    [
        "loss at step 5",
        "metric after 2 prunings",
        "prune step",
        "second prune step",
        "regulariser",
        "scheduler",
        "checkpoint",
        "rollback",
        "result",
    ],
)
def test_failure_at_every_stage_restores_everything(
    monkeypatch: pytest.MonkeyPatch, stage: str, error: BaseException
) -> None:
    setup = Setup()
    overrides: dict[str, Any] = {}
    if stage == "loss at step 5":
        overrides["loss_fn"] = failing_after(4, nn.CrossEntropyLoss(), error)
    elif stage == "metric after 2 prunings":
        overrides["metric_fn"] = failing_after(4, accuracy, error)
    elif stage == "prune step":
        overrides["prune_step"] = half_prune_then_fail(error)
    elif stage == "second prune step":
        overrides["prune_step"] = failing_after(1, iterative.magnitude_prune, error)
    elif stage == "regulariser":
        monkeypatch.setattr(setup.regularizer, "apply", failing_after(3, setup.regularizer.apply, error))
    elif stage == "scheduler":
        scheduler_type = type(setup.scheduler)
        monkeypatch.setattr(scheduler_type, "step", failing_after(2, scheduler_type.step, error))
    elif stage == "checkpoint":
        deepcopy, checkpoints = iterative.copy.deepcopy, []

        def checkpoint_fails_second_time(value: Any, *args: Any) -> Any:
            if isinstance(value, dict) and any(str(key).endswith("weight_mask") for key in value):
                checkpoints.append(1)
                if len(checkpoints) == 2:
                    raise error
            return deepcopy(value, *args)

        monkeypatch.setattr(iterative.copy, "deepcopy", checkpoint_fails_second_time)
    elif stage == "rollback":
        overrides.update(
            bound=60.0,
            backoff=0.5,
            recovery_intervals=0,
            metric_fn=lambda net: 100.0 * (1.0 - sparsity(eligible_weights(net))),
        )
        monkeypatch.setattr(
            iterative._IterativeRun, "_roll_back", failing_after(0, iterative._IterativeRun._roll_back, error)
        )
    else:
        monkeypatch.setattr(iterative._IterativeRun, "result", failing_after(0, iterative._IterativeRun.result, error))
    masked: list[bool] = []
    original_ensure_masks = iterative.ensure_masks

    def ensure_masks(weights: list[WeightRef]) -> None:
        original_ensure_masks(weights)
        masked.append(True)

    monkeypatch.setattr(iterative, "ensure_masks", ensure_masks)
    with pytest.raises(type(error)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup.run(**overrides)
    assert masked, "the failure came before the masks were installed"
    setup.assert_unchanged()


def test_a_successful_run_still_keeps_its_changes() -> None:
    setup = Setup()
    result = setup.run()
    assert result.prune_steps > 0 and hasattr(setup.model[0], "weight_mask")
