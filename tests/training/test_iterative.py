"""Tests of the metric-bounded iterative pruning driver and the regularized experiment."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ecp_fast.apps.datasets import MNIST_FILES, load_digits_split, write_idx
from ecp_fast.training.iterative import ECPPruneStep, iterative_prune, magnitude_prune
from ecp_fast.training.regularize import RelevanceDecay, eligible_weights, sparsity

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    split = load_digits_split(seed=0)
    batches = [(split.x_train[i : i + 64], split.y_train[i : i + 64]) for i in range(0, len(split.x_train), 64)]
    return batches, split.x_test, split.y_test


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def sparsity_metric(model: nn.Module) -> float:
    """A metric that falls as the network is pruned, independently of training."""
    return 100.0 * (1.0 - sparsity(eligible_weights(model)))


def test_stops_at_last_model_above_bound(digits) -> None:
    batches, _, _ = digits
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        optimizer,
        sparsity_metric,
        bound=50.0,
        interval=2,
        prune_fraction=0.2,
        recovery_intervals=2,
        warmup_intervals=1,
        progress=False,
    )
    # 0 -> 0.2 -> 0.36 -> 0.488 -> 0.5904: the last pruning step takes the metric below 50 for good.
    assert result.stop_reason == "bound" and result.met_bound
    assert result.prune_steps == 4
    assert result.sparsity == pytest.approx(0.488, abs=1e-3)
    assert sparsity(eligible_weights(result.model)) == pytest.approx(result.sparsity)
    assert sparsity_metric(result.model) >= 50.0
    # two recovery intervals were spent below the bound before stopping
    below = [entry for entry in result.history if entry.event == "train" and entry.metric < 50.0]
    assert len(below) == 3
    assert all(entry.metric >= 50.0 for entry in result.history if entry.step <= result.step and entry.event == "train")


def test_recovers_after_a_dip(digits) -> None:
    batches, _, _ = digits
    model = mlp()
    evaluations = {"since_prune": 0, "pruned": 0}
    weights = eligible_weights(model)

    def dipping_metric(_model: nn.Module) -> float:
        # below the bound on the first evaluation after every pruning step, above on the next
        current = sparsity(weights)
        if current > evaluations["pruned"]:
            evaluations["pruned"] = current
            evaluations["since_prune"] = 0
        evaluations["since_prune"] += 1
        return 0.0 if evaluations["since_prune"] == 1 and current > 0 else 100.0

    result = iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.01),
        dipping_metric,
        bound=50.0,
        interval=1,
        prune_fraction=0.5,
        recovery_intervals=1,
        warmup_intervals=0,
        max_sparsity=0.9,
        eval_after_prune=False,
        progress=False,
    )
    assert result.stop_reason == "max_sparsity"
    assert result.sparsity == pytest.approx(0.9, abs=1e-3)
    assert result.metric == 100.0


def test_real_training_never_returns_model_below_bound(digits) -> None:
    batches, x_val, y_val = digits
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    bound = 93.0
    result = iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        optimizer,
        lambda m: accuracy(m, x_val, y_val),
        bound,
        interval=len(batches),
        prune_fraction=0.3,
        recovery_intervals=1,
        warmup_intervals=2,
        regularizer=RelevanceDecay(model, gamma=1e-3, alpha=0.01, decay_steps=len(batches)),
        max_steps=60 * len(batches),
        max_sparsity=0.995,
        progress=False,
    )
    assert result.met_bound and result.prune_steps >= 3
    assert result.stop_reason == "bound"  # 99.5% of a 64-32-10 MLP cannot keep 93%
    returned = accuracy(result.model, x_val, y_val)
    assert returned == pytest.approx(result.metric) and returned >= bound
    assert sparsity(eligible_weights(result.model)) == pytest.approx(result.sparsity)
    # the state_dict checkpoint carries the masks and loads into a fresh masked model
    assert any(key.endswith("weight_mask") for key in result.state_dict)


def test_masks_survive_training(digits) -> None:
    batches, x_val, y_val = digits
    model = mlp()
    regularizer = RelevanceDecay(model, gamma=1e-2, alpha=0.1, decay_steps=5)
    result = iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2),
        lambda m: accuracy(m, x_val, y_val),
        bound=0.0,
        interval=5,
        prune_fraction=0.5,
        warmup_intervals=0,
        max_steps=20,
        regularizer=regularizer,
        eval_after_prune=False,
        progress=False,
    )
    assert result.prune_steps == 3
    for ref in eligible_weights(result.model):
        mask = ref.mask
        assert mask is not None
        assert torch.all(ref.parameter[mask == 0] == 0)  # stored values of pruned entries stay zero
        assert torch.all(ref.weight[mask == 0] == 0)
    assert sparsity(eligible_weights(result.model)) == pytest.approx(0.875, abs=1e-3)
    # trained on after the last pruning step: the 4th interval, with the masks in place
    assert result.total_steps == 20 and regularizer.schedule.step_count == 5


def test_regularizer_restarts_at_each_pruning_step(digits) -> None:
    batches, _, _ = digits
    model = mlp()
    regularizer = RelevanceDecay(model, gamma=1e-3, decay_steps=100)
    gammas = []

    def metric(_model: nn.Module) -> float:
        gammas.append(regularizer.schedule.step_count)
        return 100.0

    iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.01),
        metric,
        bound=1.0,
        interval=3,
        warmup_intervals=1,
        max_steps=12,
        regularizer=regularizer,
        eval_after_prune=False,
        progress=False,
    )
    assert gammas == [3, 6, 3, 3]  # warm-up runs on; every pruning step restarts the decay


def test_magnitude_prune_reaches_global_target_over_remaining() -> None:
    model = mlp()
    weights = eligible_weights(model)
    from ecp_fast.training.iterative import ensure_masks

    ensure_masks(weights)
    magnitude_prune(model, weights, 0.5)
    first = {ref.qualified_name: ref.mask.clone() for ref in weights}
    magnitude_prune(model, weights, 0.75)
    assert sparsity(weights) == pytest.approx(0.75, abs=1e-3)
    for ref in weights:  # pruned weights stay pruned
        assert torch.all(ref.mask[first[ref.qualified_name] == 0] == 0)


def test_ecp_prune_step_compensates_constant_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(128, 6)
    x[:, 2] = 1.5  # a constant input: its weights cost nothing to remove once the bias absorbs them
    y = torch.randint(0, 3, (128,))
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    weights = eligible_weights(model)
    from ecp_fast.training.iterative import ensure_masks

    ensure_masks(weights)
    with torch.no_grad():
        before = model(x)
    prune_step = ECPPruneStep(batches, nn.CrossEntropyLoss(), sensitivity="output")
    first_layer = model[0]
    prune_step(model, [weights[0]], 8 / 48)  # exactly the 8 weights fed by input 2
    assert torch.all(first_layer.weight_mask[:, 2] == 0) and int((first_layer.weight_mask == 0).sum()) == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    prune_step(model, weights, 0.5)
    assert sparsity(weights) == pytest.approx(0.5, abs=1e-2)


def test_ecp_in_the_driver_with_conv(digits) -> None:
    from ecp_fast.apps.experiments.regularized import LeNet5

    batches, x_val, y_val = digits
    torch.manual_seed(0)
    model = LeNet5(image_size=8)
    result = iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        torch.optim.Adam(model.parameters(), lr=1e-3),
        lambda m: accuracy(m, x_val, y_val),
        bound=0.0,
        interval=4,
        prune_fraction=0.3,
        prune_step=ECPPruneStep(batches[:1], nn.CrossEntropyLoss()),
        warmup_intervals=0,
        max_steps=12,
        eval_after_prune=False,
        progress=False,
    )
    assert result.prune_steps == 2
    assert result.sparsity == pytest.approx(1 - 0.7**2, abs=1e-3)
    assert result.model.conv1.weight_mask.shape == (20, 1, 5, 5)


def test_rejects_bad_arguments(digits) -> None:
    batches, _, _ = digits
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="interval"):
        iterative_prune(model, batches, nn.CrossEntropyLoss(), optimizer, sparsity_metric, 0.0, interval=0)
    with pytest.raises(ValueError, match="prune_fraction"):
        iterative_prune(
            model, batches, nn.CrossEntropyLoss(), optimizer, sparsity_metric, 0.0, interval=1, prune_fraction=1.0
        )
    with pytest.raises(ValueError, match="ECPPruneStep"):
        iterative_prune(
            model, batches, nn.CrossEntropyLoss(), optimizer, sparsity_metric, 0.0, interval=1, prune_step="ecp"
        )
    with pytest.raises(ValueError, match="generator"):
        iterative_prune(
            model, iter([]), nn.CrossEntropyLoss(), optimizer, sparsity_metric, 0.0, interval=1, progress=False
        )


# ---- the experiment, CI-sized --------------------------------------------------------------------


def experiment_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    from ecp_fast.apps.experiments import regularized

    parser = argparse.ArgumentParser()
    regularized.add_arguments(parser)
    return parser.parse_args(["--quick", "--no-progress", "--out", str(tmp_path / "out"), *extra])


def test_quick_experiment_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ecp_fast.apps.experiments import regularized

    assert regularized.NAME == "regularized" and regularized.HELP
    args = experiment_args(tmp_path, "--dataset", "digits", "--bound", "60")
    assert regularized.run(args) == 0
    out = tmp_path / "out"
    for name in (
        "regularized_summary.csv",
        "regularized_history.csv",
        "regularized_table.md",
        "regularized_lenet300.png",
        "regularized_lenet5.png",
    ):
        assert (out / name).stat().st_size > 0, name
    with open(out / "regularized_summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["network"], row["config"]) for row in rows] == [
        (network, config) for network in regularized.NETWORKS for config in regularized.CONFIGS
    ]
    for row in rows:
        assert row["met_bound"] == "True" and float(row["val_accuracy"]) >= 60.0
        assert float(row["sparsity"]) > 0.0
    assert "| lenet300 | decay-ecp |" in capsys.readouterr().out


def test_quick_experiment_on_synthetic_mnist_files(tmp_path: Path) -> None:
    from ecp_fast.apps.experiments import regularized

    rng = np.random.default_rng(0)
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    labels = {"train": rng.integers(0, 10, 400), "test": rng.integers(0, 10, 100)}
    for part, prefix in (("train", "train"), ("test", "test")):
        # images that encode the label, so the networks can learn something
        images = np.zeros((len(labels[part]), 28, 28), dtype=np.uint8)
        for index, label in enumerate(labels[part]):
            images[index, 2 * label : 2 * label + 3, :] = 255
        write_idx(data_dir / (MNIST_FILES[f"{prefix}_images"] + ".gz"), images)
        write_idx(data_dir / (MNIST_FILES[f"{prefix}_labels"] + ".gz"), labels[part].astype(np.uint8))
    args = experiment_args(
        tmp_path, "--data-dir", str(data_dir), "--networks", "lenet300", "--configs", "decay-magnitude", "--bound", "50"
    )
    assert regularized.run(args) == 0
    with open(tmp_path / "out" / "regularized_summary.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["met_bound"] == "True" and float(row["test_accuracy"]) >= 50.0


@pytest.mark.parametrize("where, expected", [("interval", 4), ("step", 12)])
def test_scheduler_stepping(digits, where: str, expected: int) -> None:
    batches, _, _ = digits
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        optimizer,
        lambda m: 100.0,
        bound=1.0,
        interval=3,
        max_steps=12,
        scheduler=scheduler,
        scheduler_step=where,
        eval_after_prune=False,
        progress=False,
    )
    assert scheduler.last_epoch == expected


def test_cli_discovers_the_experiment() -> None:
    cli = pytest.importorskip("ecp_fast.apps.cli")
    assert "regularized" in cli.discover_experiments()


def test_backoff_rolls_back_and_prunes_less(digits) -> None:
    batches, _, _ = digits
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    result = iterative_prune(
        model,
        batches,
        nn.CrossEntropyLoss(),
        optimizer,
        sparsity_metric,
        bound=50.0,
        interval=2,
        prune_fraction=0.2,
        recovery_intervals=0,
        warmup_intervals=1,
        backoff=0.5,
        min_prune_fraction=0.01,
        progress=False,
    )
    # Without backoff it stops at 0.488; halving the fraction after each failure gets closer to 0.5.
    assert result.stop_reason == "bound" and result.rollbacks >= 4
    assert 0.488 < result.sparsity < 0.5
    assert sparsity_metric(result.model) >= 50.0
    assert sparsity(eligible_weights(result.model)) == pytest.approx(result.sparsity)
    assert any(entry.event == "rollback" for entry in result.history)
    with pytest.raises(ValueError, match="backoff"):
        iterative_prune(model, batches, nn.CrossEntropyLoss(), optimizer, sparsity_metric, 0.0, interval=1, backoff=1.5)


def _bias_free_task(seed: int = 0):
    torch.manual_seed(seed)
    mixing = torch.randn(20, 4)
    inputs = torch.randn(576, 20)
    labels = (inputs @ mixing).argmax(1)
    batches = [(inputs[i : i + 64], labels[i : i + 64]) for i in range(0, 512, 64)]
    model = nn.Sequential(nn.Linear(20, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False))

    def metric(net: nn.Module) -> float:
        return float((net(inputs[512:]).argmax(1) == labels[512:]).float().mean())

    return model, batches, metric


@pytest.mark.parametrize("backoff", [None, 0.5])
def test_ecp_steps_on_bias_free_layers_train_the_biases_they_add_and_go_back_before_them(backoff) -> None:
    """A compensating step adds biases to bias-free layers: the optimizer trains them, and a checkpoint
    taken before them (the dense model, when the first step breaks the bound) loads without them."""
    model, batches, metric = _bias_free_task()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = ECPPruneStep(batches[:2], nn.functional.cross_entropy)
    result = iterative_prune(
        model, batches, nn.functional.cross_entropy, optimizer, metric, 0.0, interval=10, prune_step=step,
        prune_fraction=0.5, backoff=backoff, recovery_intervals=0, max_steps=30, progress=False,
    )  # fmt: skip
    assert result.met_bound and result.sparsity > 0
    assert model[0].bias is not None and any(model[0].bias is p for g in optimizer.param_groups for p in g["params"])
    trained = model[0].bias.detach().clone()
    model(batches[0][0]).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].bias.detach(), trained)

    model, batches, metric = _bias_free_task()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    result = iterative_prune(
        model, batches, nn.functional.cross_entropy, optimizer, metric, 0.85, interval=20,
        prune_step=ECPPruneStep(batches[:2], nn.functional.cross_entropy), prune_fraction=0.99, backoff=backoff,
        min_prune_fraction=0.9, recovery_intervals=0, max_steps=200, progress=False,
    )  # fmt: skip
    # the dense model met the bound, the first (99%) step broke it: back to a checkpoint without biases
    assert result.met_bound and result.sparsity == 0.0 and result.stop_reason == "bound"
    assert model[0].bias is None and model[2].bias is None and set(result.state_dict) == set(model.state_dict())
    assert all(any(p is q for q in model.parameters()) for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("kind", ["one-cycle", "step"])
def test_biases_a_step_adds_train_under_a_learning_rate_scheduler(kind) -> None:
    """The added biases join the optimizer's last group: schedulers that keep per-group state see no
    new group, and the biases follow the group's rate."""
    model, batches, metric = _bias_free_task()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "one-cycle":
        scheduler, where = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=40), "step"
    else:
        scheduler, where = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9), "interval"
    result = iterative_prune(
        model, batches, nn.functional.cross_entropy, optimizer, metric, 0.0, interval=10,
        prune_step=ECPPruneStep(batches[:2], nn.functional.cross_entropy), prune_fraction=0.5,
        scheduler=scheduler, scheduler_step=where, max_steps=40, progress=False,
    )  # fmt: skip
    assert result.met_bound and result.sparsity > 0 and len(optimizer.param_groups) == 1
    assert any(model[0].bias is p for p in optimizer.param_groups[0]["params"])
