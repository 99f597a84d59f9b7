"""Every sensitivity against its definition (docs/method.md) and the reference implementation."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import ecp_fast
from ecp_fast.ops import reference
from ecp_fast.pruning.importance import (
    IMPORTANCES,
    NONLINEAR_MAX_WEIGHTS,
    Importance,
    ScoringContext,
    get_method,
    register_importance,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tanh_mlp(sizes=(6, 9, 4), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


@pytest.fixture
def calibrated():
    model = tanh_mlp()
    x = torch.randn(60, 6, dtype=torch.float64)
    targets = torch.randint(0, 4, (60,))
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([(x[:25], targets[:25]), (x[25:], targets[25:])], loss_fn=nn.CrossEntropyLoss())
    return model, x, targets, pruner


def test_every_method_is_registered_with_one_signature():
    assert {"ecp", "obd", "magnitude", "gradient", "taylor", "wanda", "random", "nonlinear"} <= set(IMPORTANCES)
    assert get_method("ecp").compensates and get_method("nonlinear").compensates
    assert not any(get_method(m).compensates for m in ("obd", "magnitude", "gradient", "taylor", "wanda", "random"))
    with pytest.raises(ValueError, match="argument 'method'.*'nope'"):
        get_method("nope")


def test_ecp_and_obd_equal_the_reference_score_on_all_data(calibrated):
    model, x, _, pruner = calibrated
    layers = reference.sensitivities(model, x)
    ecp = pruner.importances("ecp")
    obd = pruner.importances("obd")
    for name, layer in layers.items():
        weight = dict(model.named_children())[name].weight.detach()
        importance, bias_delta = reference.score(layer.x, layer.g, weight, compensate=True)
        torch.testing.assert_close(ecp[name].score, importance)
        torch.testing.assert_close(ecp[name].bias_delta, bias_delta)
        uncompensated, _ = reference.score(layer.x, layer.g, weight, compensate=False)
        torch.testing.assert_close(obd[name].score, uncompensated)
        assert obd[name].bias_delta is None
        # Compensation can only lower the error.
        assert bool((ecp[name].score <= uncompensated * (1 + 1e-12) + 1e-15).all())


def test_baselines_follow_their_formulas(calibrated):
    model, x, targets, pruner = calibrated
    model.zero_grad()
    F.cross_entropy(model(x), targets, reduction="sum").backward()
    hidden = torch.tanh(model[0](x)).detach()
    inputs = {"0": x, "2": hidden}
    for method, formula in {
        "magnitude": lambda w, grad, a: w.abs(),
        "gradient": lambda w, grad, a: grad.abs(),
        "taylor": lambda w, grad, a: (w * grad).abs(),
        "wanda": lambda w, grad, a: w.abs() * a.norm(dim=0),
    }.items():
        scores = pruner.importances(method)
        for name in ("0", "2"):
            layer = dict(model.named_children())[name]
            expected = formula(layer.weight.detach(), layer.weight.grad, inputs[name])
            torch.testing.assert_close(scores[name].score, expected, msg=lambda m: f"{method}/{name}: {m}")


def test_random_is_reproducible_by_seed():
    model = tanh_mlp()
    first = ecp_fast.Pruner(model, seed=3, progress=False).importances("random")
    again = ecp_fast.Pruner(model, seed=3, progress=False).importances("random")
    other = ecp_fast.Pruner(model, seed=4, progress=False).importances("random")
    torch.testing.assert_close(first["0"].score, again["0"].score)
    assert not torch.equal(first["0"].score, other["0"].score)


def test_nonlinear_is_the_exact_compensated_error_and_ecp_ranks_like_it():
    model = tanh_mlp(sizes=(5, 7, 3), seed=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)  # near-linear regime, where first order is accurate
    x = torch.randn(40, 5, dtype=torch.float64)
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([x[:13], x[13:]])
    exact = pruner.importances("nonlinear")
    ecp = pruner.importances("ecp")
    for name in ("0", "2"):
        expected = reference.exact_compensated_error(model, x, name)
        torch.testing.assert_close(exact[name].score, expected.error)
        torch.testing.assert_close(exact[name].bias_delta, expected.bias_delta)
        rho = spearmanr(ecp[name].score.flatten().numpy(), exact[name].score.flatten().numpy()).statistic
        assert rho > 0.98, f"layer {name}: Spearman {rho}"
    # The output layer acts linearly on the output: there first order is exact, shift included.
    torch.testing.assert_close(ecp["2"].score, exact["2"].score)
    torch.testing.assert_close(ecp["2"].bias_delta, exact["2"].bias_delta)


def test_nonlinear_refuses_large_models_with_a_clear_message():
    model = nn.Sequential(nn.Linear(200, 120), nn.ReLU(), nn.Linear(120, 2))
    pruner = ecp_fast.Pruner(model, progress=False)
    pruner.calibrate([torch.randn(4, 200)])
    with pytest.raises(ValueError, match=f"at most {NONLINEAR_MAX_WEIGHTS} weights.*got 24240"):
        pruner.importances("nonlinear")


def test_a_registered_method_is_usable_by_name():
    @register_importance("negated_magnitude_for_test", compensates=False, needs_calibration=False)
    def negated(context: ScoringContext) -> Importance:
        return Importance(-context.weight.abs(), None)

    try:
        model = tanh_mlp()
        weights = model[0].weight.detach().abs().clone()
        report = ecp_fast.Pruner(model, layers=["0"], progress=False).prune(
            0.5, method="negated_magnitude_for_test", scope="layer"
        )
        assert report.total_pruned == 27
        kept = model[0].weight_mask.bool()
        # The largest weights were removed.
        assert weights[~kept].min() >= weights[kept].max()
    finally:
        del IMPORTANCES["negated_magnitude_for_test"]


def test_methods_without_their_statistics_say_what_is_missing():
    model = tanh_mlp()
    pruner = ecp_fast.Pruner(model, progress=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.importances("ecp")
    pruner.calibrate([torch.randn(5, 6, dtype=torch.float64)])  # no targets, no loss
    with pytest.raises(RuntimeError, match="loss_fn"):
        pruner.importances("gradient")
    assert pruner.importances("magnitude")["0"].score.shape == (9, 6)
