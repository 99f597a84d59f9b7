"""Tests of structured ECP: neuron scores, compensation, model surgery, errors and portability."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fingerprint import assert_unchanged, failing_after, fingerprint
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import ecp_fast
from ecp_fast import Pruner
from ecp_fast.pruning import structured
from ecp_fast.pruning.structured import (
    METHODS,
    NeuronPair,
    find_neuron_pairs,
    linear_flops,
    mask_neurons,
    neuron_scores,
    plan_neurons,
    prune_neurons,
    resolve_pairs,
)


def mlp(seed: int = 0, sizes: tuple[int, ...] = (12, 20, 14, 5), act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(act())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).double().eval()


def inputs(n: int = 96, features: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def calibrated(model: nn.Module, x: torch.Tensor, sensitivity: str = "output") -> Pruner:
    pruner = Pruner(model, sensitivity=sensitivity, progress=False)
    pruner.calibrate([x[: len(x) // 2], x[len(x) // 2 :]])
    return pruner


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


# ---- scores --------------------------------------------------------------------------------------


def test_pairs_detected_in_sequential() -> None:
    model = mlp()
    assert find_neuron_pairs(model) == [NeuronPair("0", "2"), NeuronPair("2", "4")]


def test_ecp_score_is_row_sum_of_unstructured_importance() -> None:
    """Consumer "2" in the middle: g = dy/dz_2 = W_4 diag(tanh'(z_2)) per sample, exact rows."""
    model = mlp()
    x = inputs()
    pruner = calibrated(model, x)
    scores = neuron_scores(model, resolve_pairs(model), "ecp", pruner.statistics)
    with torch.no_grad():
        a = torch.tanh(model[0](x))
        z = model[2](a)
        g = model[4].weight.unsqueeze(1) * (1 - torch.tanh(z).square()).unsqueeze(0)  # (outputs, N, out)
    importance, _ = ecp_fast.score(a, g, model[2].weight.detach())
    torch.testing.assert_close(scores["2"].score, importance.sum(dim=0), rtol=1e-9, atol=1e-12)
    obd = neuron_scores(model, resolve_pairs(model), "obd", pruner.statistics)
    uncompensated, _ = ecp_fast.score(a, g, model[2].weight.detach(), compensate=False)
    torch.testing.assert_close(obd["2"].score, uncompensated.sum(dim=0), rtol=1e-9, atol=1e-12)


def test_local_score_is_variance_score() -> None:
    model = mlp()
    x = inputs()
    pruner = calibrated(model, x, sensitivity="local")
    scores = neuron_scores(model, resolve_pairs(model), "local", pruner.statistics)
    with torch.no_grad():
        a = torch.tanh(model[0](x))
    expected = model[2].weight.detach().square().sum(dim=0) * (a - a.mean(0)).square().sum(dim=0)
    torch.testing.assert_close(scores["2"].score, expected, rtol=1e-9, atol=1e-12)


def test_norm_scores() -> None:
    model = mlp()
    scores = neuron_scores(model, resolve_pairs(model), "norm")
    torch.testing.assert_close(scores["4"].score, model[4].weight.detach().norm(dim=0))
    io = neuron_scores(model, resolve_pairs(model), "norm_io")
    rows = torch.cat([model[2].weight, model[2].bias.unsqueeze(1)], dim=1).detach().norm(dim=1)
    torch.testing.assert_close(io["4"].score, model[4].weight.detach().norm(dim=0) * rows)


# ---- compensation --------------------------------------------------------------------------------


def test_single_neuron_error_equals_score_at_last_layer() -> None:
    """The consumer is the output layer (c = 1, linear): the first-order error is exact."""
    model = mlp()
    x = inputs()
    for method in ("ecp", "obd"):
        pruner = calibrated(copy.deepcopy(model), x)
        plan = plan_neurons(pruner.model, 0.0, method, "layer", [("2", "4")], pruner.statistics)
        scores = plan.scores["4"].score
        # Remove exactly one neuron (the least important): ratio 1/14 of the 14 hidden units.
        report = prune_neurons(pruner, 1 / 14, method=method, scope="layer", pairs=[("2", "4")])
        (removed,) = report.plan.removed["4"]
        assert removed == int(torch.argmin(scores))
        with torch.no_grad():
            error = (report.model(x) - model(x)).square().sum()
        torch.testing.assert_close(error, scores[removed], rtol=1e-9, atol=1e-12)


def test_constant_neuron_costs_nothing() -> None:
    model = mlp(act=nn.ReLU)
    with torch.no_grad():
        model[0].weight[7] = 0
        model[0].bias[7] = 1.5  # neuron 7 outputs relu(1.5) for every sample
    x = inputs()
    pruner = calibrated(model, x)
    before = model(x).detach()
    report = prune_neurons(pruner, 1 / 20, method="ecp", scope="layer", pairs=[("0", "2")])
    assert report.plan.removed["2"] == [7]
    assert model[0].out_features == 19 and model[2].in_features == 19
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=1e-12)
    # Without compensation the same removal changes the output.
    plain = mlp(act=nn.ReLU)
    with torch.no_grad():
        plain[0].weight[7] = 0
        plain[0].bias[7] = 1.5
    prune_neurons(calibrated(plain, x), 1 / 20, method="obd", scope="layer", pairs=[("0", "2")])
    assert (plain(x).detach() - before).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_shrunken_equals_masked_and_compensated(method: str, scope: str) -> None:
    model = mlp()
    x = inputs()
    pruner = calibrated(copy.deepcopy(model), x)
    report = prune_neurons(pruner, 0.5, method=method, scope=scope, batches=[x])
    reference = copy.deepcopy(model)
    mask_neurons(reference, report.plan)
    small = report.model
    assert small[0].out_features + small[2].out_features == report.hidden_after
    assert report.hidden_after == 17  # 34 hidden units, half removed in either scope
    with torch.no_grad():
        torch.testing.assert_close(small(x), reference(x), rtol=1e-12, atol=1e-12)
    assert report.parameters_after < report.parameters_before
    assert report.flops_after == linear_flops(small) < report.flops_before
    assert report.compensated == (method in ("ecp", "local"))


def test_batchnorm_entries_sliced() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.GELU(), nn.Linear(24, 6)).double().eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    assert find_neuron_pairs(model) == [NeuronPair("0", "3", ("1",))]
    x = inputs()
    reference = copy.deepcopy(model)
    report = prune_neurons(calibrated(model, x), 0.25, method="ecp")
    mask_neurons(reference, report.plan)
    assert model[1].num_features == 18 and model[1].running_mean.shape == (18,) and model[1].weight.shape == (18,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


def test_layernorm_entries_sliced() -> None:
    """LayerNorm couples the features: the smaller one normalises over the kept features only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 6)).double().eval()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    original = copy.deepcopy(model)
    x = inputs()
    report = prune_neurons(calibrated(model, x), 0.25, method="ecp")
    keep = report.plan.keep["3"]
    assert model[1].normalized_shape == (18,) and model[1].weight.shape == (18,)
    with torch.no_grad():
        hidden = original[0](x)[:, keep]
        normed = F.layer_norm(hidden, (18,), original[1].weight[keep], original[1].bias[keep], original[1].eps)
        expected = F.linear(F.relu(normed), original[3].weight[:, keep], original[3].bias + report.plan.bias_shift["3"])
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


class Block(nn.Module):
    """A pre-norm transformer-style MLP block: x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(8, 32), Block(8, 32)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


@pytest.mark.parametrize("explicit", [False, True])
def test_transformer_style_blocks(explicit: bool) -> None:
    torch.manual_seed(0)
    model = TinyTransformer().double().eval()
    expected_pairs = [NeuronPair("blocks.0.fc1", "blocks.0.fc2"), NeuronPair("blocks.1.fc1", "blocks.1.fc2")]
    assert find_neuron_pairs(model) == expected_pairs
    pairs = [("blocks.0.fc1", "blocks.0.fc2"), ("blocks.1.fc1", "blocks.1.fc2")] if explicit else None
    x = torch.randn(16, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model)
    report = prune_neurons(calibrated(model, x), 0.5, method="ecp", scope="layer", pairs=pairs)
    mask_neurons(reference, report.plan)
    assert model.blocks[0].fc1.out_features == 16 and model.blocks[1].fc2.in_features == 16
    assert model.head.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


def test_inplace_false_leaves_model_and_pruner_is_refreshed() -> None:
    model = mlp()
    x = inputs()
    before = state(model)
    report = prune_neurons(model, 0.5, method="ecp", batches=[x], inplace=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.model is not model and report.model[0].out_features < 20
    pruner = calibrated(model, x)
    prune_neurons(pruner, 0.5, method="ecp")
    assert pruner.calibration is None and pruner.layers["2"].module is model[2]


def test_masked_layers_keep_sliced_masks() -> None:
    model = mlp()
    x = inputs()
    pruner = calibrated(model, x)
    pruner.prune(0.5, method="ecp", scope="layer")
    expected_zeros = model[2].weight_mask == 0
    pruner.calibrate([x])
    report = prune_neurons(pruner, 0.25, method="ecp", scope="layer")
    keep_rows, keep_cols = report.plan.keep["4"], report.plan.keep["2"]
    assert torch.equal(model[2].weight_mask == 0, expected_zeros[keep_rows][:, keep_cols])
    assert isinstance(model[2], nn.Linear) and hasattr(model[2], "weight_orig")


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ratio": 1.0}, ValueError, "ratio"),
        ({"ratio": -0.1}, ValueError, "ratio"),
        ({"ratio": "half"}, TypeError, "ratio"),
        ({"method": "taylor"}, ValueError, "method"),
        ({"scope": "row"}, ValueError, "scope"),
        ({"pairs": [("0", "4")]}, ValueError, "outputs but consumer"),
        ({"pairs": [("0", "nope")]}, ValueError, "no module named 'nope'"),
        ({"pairs": [("1", "2")]}, ValueError, "must be an nn.Linear"),
        ({"pairs": [("0", "2"), ("0", "2")]}, ValueError, "more than once"),
        ({"pairs": [("0", "2", "4")]}, ValueError, "BatchNorm1d, LayerNorm or PReLU"),
        ({"pairs": 3}, TypeError, "'pairs' must be a sequence"),
        ({"pairs": [3]}, ValueError, "each entry must be"),
        ({"pairs": [("0", "2", 4)]}, ValueError, "must be module names"),
        ({"normalize": "max"}, ValueError, "'normalize' must be one of"),
        ({"min_keep": 0}, ValueError, "'min_keep' must be a positive integer, got 0"),
        ({"compensate": "yes"}, TypeError, "'compensate' must be True, False or None, got 'yes'"),
        ({"inplace": None}, TypeError, "'inplace' must be a bool, got None"),
        ({"batches": torch.zeros(4, 12)}, TypeError, "single Tensor"),
        ({"batches": 5}, TypeError, "'batches' must be an iterable of batches or None, got int"),
        ({"sensitivity": "fisher"}, ValueError, "'sensitivity' must be one of"),
    ],
)
def test_bad_input_raises_and_leaves_model(kwargs: dict, error: type[Exception], match: str) -> None:
    model = mlp()
    pruner = calibrated(model, inputs())
    before = fingerprint(model)
    arguments = {"ratio": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        prune_neurons(pruner, **arguments)
    assert_unchanged(before, model)
    assert pruner.calibration is not None


def test_missing_statistics_raise() -> None:
    model = mlp()
    pruner = Pruner(model, layers=["0", "2"], progress=False)
    pruner.calibrate([inputs()])
    before = state(model)
    with pytest.raises(ValueError, match="statistics of consumer layer '4'"):
        prune_neurons(pruner, 0.5, method="ecp")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune_neurons(mlp(), 0.5, method="ecp")


# ---- portability ---------------------------------------------------------------------------------


def test_pruned_model_loads_without_ecp_fast(tmp_path: Path) -> None:
    model = mlp(act=nn.ReLU).float()
    x = inputs().float()
    pruner = calibrated(model, x)
    report = prune_neurons(pruner, 0.5, method="ecp", scope="layer")
    torch.save(report.model, tmp_path / "model.pt")
    torch.save(report.model.state_dict(), tmp_path / "state.pt")
    torch.save(x, tmp_path / "x.pt")
    expected = report.model(x).detach()
    child = textwrap.dedent(
        f"""
        import sys
        sys.modules["ecp_fast"] = None  # any import of ecp_fast now fails
        import torch
        from torch import nn
        x = torch.load({str(tmp_path / "x.pt")!r})
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False).eval()
        state = torch.load({str(tmp_path / "state.pt")!r})
        sizes = [state["0.weight"].shape[1], state["0.weight"].shape[0], state["2.weight"].shape[0],
                 state["4.weight"].shape[0]]
        rebuilt = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]), nn.ReLU(),
                                nn.Linear(sizes[2], sizes[3])).eval()
        rebuilt.load_state_dict(state)
        assert not any(name.startswith("ecp_fast") and sys.modules[name] is not None for name in sys.modules)
        with torch.no_grad():
            torch.save((model(x), rebuilt(x), sizes), {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, timeout=60)
    from_pickle, from_state, sizes = torch.load(tmp_path / "out.pt")
    assert sizes == [12, 10, 7, 5]
    torch.testing.assert_close(from_pickle, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_state, expected, rtol=0, atol=0)


# ---- no half-pruned model: bad inputs and failures at every stage -------------------------------------

BAD_VALUES: dict[str, list[Any]] = {
    "ratio": [-0.1, 1.0, 1.5, float("nan"), float("inf"), "half", None, True, [0.5]],
    "method": ["taylor", 3, None, ""],
    "scope": ["row", None, 1],
    "pairs": [[("0", "4")], [("0", "nope")], "0,2", [("0",)], [("1", "2")], [], 7, [("0", "2", 5)]],
    "sensitivity": ["bogus", None],
    "normalize": ["max", None, 1],
    "min_keep": [0, -1, 1.5, True, "1"],
    "compensate": ["yes", 1, 0.0],
    "inplace": ["no", None, 1],
    "batches": [5, "x", torch.zeros(3, 12)],
}
GOOD_VALUES: dict[str, list[Any]] = {
    "ratio": [0.0, 0.25, 0.5],
    "method": ["ecp", "norm", "local", "magnitude"],
    "scope": ["global", "layer"],
    "pairs": [None, [("2", "4")]],
    "normalize": ["auto", "mean"],
    "min_keep": [1, 3],
    "compensate": [None, True],
    "inplace": [True, False],
}


@st.composite
def bad_arguments(draw: st.DrawFn) -> dict[str, Any]:
    """Arguments of prune_neurons with at least one bad value among good ones."""
    arguments = {name: draw(st.sampled_from(values)) for name, values in GOOD_VALUES.items() if draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), min_size=1, max_size=3, unique=True)):
        arguments[name] = draw(st.sampled_from(BAD_VALUES[name]))
    return arguments


_SHARED: dict[str, Pruner] = {}


@settings(max_examples=80, deadline=None)
@given(arguments=bad_arguments(), use_pruner=st.booleans())
def test_bad_arguments_never_change_the_model(arguments: dict[str, Any], use_pruner: bool) -> None:
    # One calibrated model serves every example: a bad call must leave it as it is, which is checked.
    if "subject" not in _SHARED:
        _SHARED["subject"] = calibrated(mlp(), inputs())
    model, x = _SHARED["subject"].model, inputs()
    pruner = _SHARED["subject"] if use_pruner else None
    layers, calibration = (pruner.layers, pruner.calibration) if pruner else (None, None)
    before = fingerprint(model)
    arguments = {"ratio": 0.5, **arguments}
    if not use_pruner:
        arguments.setdefault("batches", [x])
    with pytest.raises((TypeError, ValueError)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_neurons(pruner if pruner else model, **arguments)
    assert_unchanged(before, model)
    if pruner is not None:
        assert pruner.layers is layers and pruner.calibration is calibration


def rich_model() -> nn.Sequential:
    """An MLP with a BatchNorm, a mask, a forward hook and a bias-less consumer: everything to undo."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Linear(12, 20), nn.BatchNorm1d(20), nn.Tanh(), nn.Linear(20, 14, bias=False), nn.ReLU(), nn.Linear(14, 5)
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        model[1].running_mean.normal_()
    ecp_fast.pruning.masks.install_mask(model[3], (torch.rand(14, 20) > 0.3).double())
    model[5].register_forward_hook(lambda *args: None)
    return model


# Each stage: (function of the structured module to break, calls that succeed first)
STAGES = {
    "calibration": ("Pruner.calibrate", 0),
    "local statistics": ("_local_statistics", 0),
    "scores": ("neuron_scores", 0),
    "selection": ("select_neurons", 0),
    "new Linear": ("_build_linear", 1),
    "new BatchNorm": ("_build_per_feature", 0),
    "half swapped": ("_parent_and_attribute", 2),
    "re-resolve pruner": ("resolve_layers", 0),
    "report": ("count_parameters", 1),
    "log": ("logger.info", 0),
}


def _break(monkeypatch: pytest.MonkeyPatch, target: str, calls: int, error: BaseException) -> None:
    owner: Any = structured
    *path, attribute = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, attribute, failing_after(calls, getattr(owner, attribute), error))


@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_failure_at_every_stage_restores_model_and_pruner(
    monkeypatch: pytest.MonkeyPatch, stage: str, error: BaseException
) -> None:
    model = rich_model()
    x = inputs()
    pruner = calibrated(model, x)
    layers, calibration = pruner.layers, pruner.calibration
    before = fingerprint(model)
    reference = model(x)
    target, calls = STAGES[stage]
    _break(monkeypatch, target, calls, error)
    method = "local" if stage == "local statistics" else "ecp"
    subject = model if stage == "calibration" else pruner
    with pytest.raises(type(error)):
        prune_neurons(subject, 0.5, method=method, batches=[x] if subject is model else None)
    assert_unchanged(before, model)
    assert pruner.layers is layers and pruner.calibration is calibration
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_dead_units_and_a_short_removal_warn() -> None:
    model = mlp()
    x = inputs()
    with torch.no_grad():
        model[2].weight[:, :10] = 0  # half of the first hidden layer already switched off
    with pytest.warns(UserWarning, match="already switched off"):
        prune_neurons(model, 0.2, method="norm", pairs=[("0", "2")])
    with pytest.warns(UserWarning, match="fewer than ratio=0.9 asks"):
        report = prune_neurons(mlp(), 0.9, method="ecp", batches=[x], scope="layer", min_keep=5)
    assert report.removed_fraction < 0.9


def test_mask_neurons_checks_the_plan_and_is_atomic(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    report = prune_neurons(model, 0.5, method="ecp", batches=[inputs()], inplace=False)
    other = mlp(sizes=(12, 9, 14, 5))
    before = fingerprint(other)
    with pytest.raises(ValueError, match="plan and model disagree"):
        mask_neurons(other, report.plan)
    assert_unchanged(before, other)
    before = fingerprint(model)
    monkeypatch.setattr(
        structured, "weight_parameter", failing_after(1, structured.weight_parameter, KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        mask_neurons(model, report.plan)
    assert_unchanged(before, model)


# ---- per-feature modules of given and named pairs, loss sensitivity, NumPy ratios -----------------------


class NamedBlock(nn.Module):
    """fc2(relu(bn1(fc1(x)))): a BatchNorm1d beside a named fc1 / fc2 pair, outside any nn.Sequential."""

    def __init__(self, width: int = 12, hidden: int = 20, out: int = 5) -> None:
        super().__init__()
        self.fc1, self.bn1, self.fc2 = nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn1(self.fc1(x))))


def with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
    return model


@pytest.mark.parametrize(
    "build, pairs, norm",
    [
        (lambda: nn.Sequential(nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 5)), [("0", "3")], "1"),
        (NamedBlock, None, "bn1"),
        (NamedBlock, [("fc1", "fc2")], "bn1"),
    ],
    ids=["sequential-given", "named-detected", "named-given"],
)
@pytest.mark.parametrize("method", ["norm", "ecp"])
def test_a_batchnorm_between_a_pair_is_sliced_with_its_units(build, pairs, norm: str, method: str) -> None:
    model = with_statistics(build())
    x = inputs()
    reference = copy.deepcopy(model)
    report = prune_neurons(model, 0.25, method=method, pairs=pairs, batches=[x])
    assert report.plan.pairs[0].norms == (norm,)
    mask_neurons(reference, report.plan)
    bn = model.get_submodule(norm)
    assert bn.num_features == 15 and bn.running_mean.shape == (15,) and bn.weight.shape == (15,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


def test_a_sibling_norm_that_may_feed_another_tensor_is_refused_when_detected() -> None:
    """fc1: 12 -> 12 and bn1(12): bn1 could normalise the block's input as well as the hidden units."""
    model = with_statistics(NamedBlock(width=12, hidden=12))
    before = fingerprint(model)
    assert find_neuron_pairs(model) == []
    with pytest.raises(ValueError, match=r"argument 'pairs' is None and the detected pair \('fc1', 'fc2'\).*\['bn1'\]"):
        prune_neurons(model, 0.5, method="norm")
    assert_unchanged(before, model)
    x = inputs()
    prune_neurons(model, 0.5, method="norm", pairs=[("fc1", "fc2", "bn1")])  # named: taken as given
    assert model.bn1.num_features == 6 and model(x).shape == (96, 5)


def loss_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    x = inputs()
    return [
        (x[:48], torch.randint(0, 5, (48,), generator=generator)),
        (x[48:], torch.randint(0, 5, (48,), generator=generator)),
    ]


def test_loss_sensitivity_of_a_bare_model_takes_loss_fn() -> None:
    batches = loss_batches()
    pruner = Pruner(mlp(), sensitivity="loss", progress=False)
    pruner.calibrate(batches, loss_fn=F.cross_entropy)
    expected = prune_neurons(pruner, 0.5, method="ecp", inplace=False)
    model = mlp()
    report = prune_neurons(model, 0.5, method="ecp", batches=batches, sensitivity="loss", loss_fn=F.cross_entropy)
    assert report.plan.removed == expected.plan.removed
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), expected.model(inputs()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        ({"sensitivity": "loss"}, ValueError, r"argument 'loss_fn': sensitivity='loss'.*got loss_fn=None"),
        ({"sensitivity": "loss", "loss_fn": "cross_entropy"}, TypeError, "argument 'loss_fn' must be a callable"),
        ({"use_pruner": True, "loss_fn": F.cross_entropy}, ValueError, "argument 'loss_fn'.*a Pruner"),
    ],
)
def test_a_loss_fn_that_cannot_serve_names_the_argument(arguments: dict, error: type[Exception], match: str) -> None:
    model = mlp()
    subject = calibrated(model, inputs()) if arguments.pop("use_pruner", False) else model
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        prune_neurons(subject, 0.5, method="ecp", batches=loss_batches(), **arguments)
    assert_unchanged(before, model)


@pytest.mark.parametrize("ratio", [np.float32(0.5), np.float64(0.5), np.int64(0)])
def test_numpy_ratios_are_taken_as_python_numbers(ratio: Any) -> None:
    model = mlp()
    report = prune_neurons(model, ratio, method="norm", scope="layer")
    expected = prune_neurons(mlp(), float(ratio), method="norm", scope="layer")
    assert type(report.ratio) is float and report.ratio == float(ratio)
    assert report.plan.removed == expected.plan.removed
    before = fingerprint(model)
    with pytest.raises(TypeError, match="argument 'ratio' must be a float in"):
        prune_neurons(model, np.bool_(False), method="norm")
    assert_unchanged(before, model)


class _ResidualThroughHidden(nn.Module):
    """``head(fc2(relu(h)) + h)`` with ``h = fc1(x)``: the hidden units feed the residual sum too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        return self.head(self.fc2(torch.relu(hidden)) + hidden)


@pytest.mark.parametrize("through", ["function", "pruner", "copy"])
def test_hidden_units_a_residual_reads_are_refused_after_one_batch_and_the_model_is_as_it_was(through: str) -> None:
    """The detected pair (fc1, fc2) would leave a model that fails at its next call: one calibration
    batch through the smaller model finds it, and the transaction restores everything."""
    model = _ResidualThroughHidden().train()
    x = torch.randn(64, 8)
    batches = [(x, torch.randint(0, 4, (64,)))]
    before = fingerprint(model)
    expected = r"argument 'pairs': after removing hidden units of \('fc1', 'fc2'\) the model no longer runs"
    with pytest.raises(ValueError, match=expected):
        if through == "pruner":
            pruner = Pruner(model, progress=False)
            pruner.calibrate(batches)
            pruner.prune(0.5, method="ecp", scope="neuron")
        else:
            prune_neurons(model, 0.5, batches=batches, inplace=through == "function")
    assert_unchanged(before, model)
    assert model(x).shape == (64, 4)
