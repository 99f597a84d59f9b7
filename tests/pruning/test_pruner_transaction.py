"""Pruner.prune is one transaction: validated first, and any failure restores the model exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from fingerprint import assert_unchanged, fingerprint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ecp_fast
from ecp_fast.pruning import pruner as pruner_module
from ecp_fast.pruning.importance import Importance


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(2)
    ]


def _calibrated(model: nn.Module) -> ecp_fast.Pruner:
    pruner = ecp_fast.Pruner(model, sensitivity="output", progress=False)
    pruner.calibrate(_batches(), loss_fn=nn.CrossEntropyLoss())
    return pruner


def test_a_weight_norm_layer_is_refused_before_any_change() -> None:
    model = _model()
    model[2] = nn.utils.weight_norm(model[2])
    pruner = ecp_fast.Pruner(model, sensitivity="local", layers=["0", "4"], progress=False)
    pruner.calibrate(_batches())
    model[4] = nn.utils.weight_norm(model[4])  # parametrized after the pruner was made
    before = fingerprint(model)
    with pytest.raises(ValueError, match="layer '4' has a parametrized weight"):
        pruner.prune(0.5)
    assert_unchanged(before, model)


STAGES = [
    (pruner_module, "select_weights"),  # selection
    (pruner_module.Pruner, "_apply"),  # applying a step
    (pruner_module, "install_mask"),  # installing masks
    (pruner_module.Pruner, "importances"),  # scoring
    (pruner_module.Pruner, "calibrate"),  # recalibration between steps
]


@pytest.mark.parametrize("target, name", STAGES, ids=[name for _, name in STAGES])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_at_every_stage_restores_the_model_bit_identically(monkeypatch, target, name, error) -> None:
    model = _model()
    pruner = _calibrated(model)
    calibration = pruner.calibration
    original = getattr(target, name)
    calls = {"count": 0}

    def failing(*args, **kwargs):
        calls["count"] += 1
        # Let the first calls through so that a later stage (the second step, the last layer) fails.
        if calls["count"] >= (2 if name in ("_apply", "install_mask", "importances") else 1):
            raise error("injected")
        return original(*args, **kwargs)

    before = fingerprint(model)
    monkeypatch.setattr(target, name, failing)
    with pytest.raises(error):
        pruner.prune(0.6, method="ecp", steps=3)
    assert calls["count"] >= 1
    assert_unchanged(before, model)
    assert pruner.calibration is calibration


@given(
    sparsity=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-3, 3),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
    ),
    method=st.sampled_from(["ecp", "magnitude", "nope", "", "ECP"]),
    scope=st.sampled_from(["global", "layer", "row", "2:4", "3:2", "1:4:2", "x", "neuron2"]),
    steps=st.one_of(st.integers(-2, 3), st.floats(0, 3), st.none()),
)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bad_arguments_leave_the_model_exactly_as_it_was(sparsity, method, scope, steps) -> None:
    model = _model()
    pruner = _calibrated(model)
    before = fingerprint(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = pruner.prune(sparsity, method=method, scope=scope, steps=steps)
    except (TypeError, ValueError) as error:
        assert "argument" in str(error)
        assert_unchanged(before, model)
    else:  # a valid call: the report says what the masks hold
        zeros = sum(int((m.weight_mask == 0).sum()) for m in model if hasattr(m, "weight_mask"))
        assert report.total_pruned == zeros


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda imp: Importance(imp.score.fill_(float("nan")), imp.bias_delta), "score of layer '0' contains NaN"),
        (lambda imp: Importance(imp.score, imp.bias_delta.fill_(float("nan"))), "bias_delta of layer '0' contains NaN"),
        (lambda imp: Importance(imp.score[:, :3], imp.bias_delta), "score of shape"),
        (lambda imp: Importance(imp.score, imp.bias_delta[0]), "bias_delta of shape"),
        (lambda imp: (imp.score, imp.bias_delta), "must map to an Importance"),
    ],
)
def test_bad_precomputed_importances_are_refused(corrupt, message) -> None:
    model = _model()
    pruner = _calibrated(model)
    scores = pruner.importances("ecp")
    scores["0"] = corrupt(scores["0"])
    before = fingerprint(model)
    with pytest.raises((ValueError, TypeError), match=message):
        pruner.prune(0.5, method="ecp", importances=scores)
    assert_unchanged(before, model)


def test_asking_for_less_sparsity_than_the_model_has_warns_and_reports_the_truth() -> None:
    model = _model()
    pruner = _calibrated(model)
    pruner.prune(0.7, method="magnitude")
    with pytest.warns(UserWarning, match="already 0.69"):
        report = pruner.prune(0.3, method="magnitude")
    assert report.sparsity == pytest.approx(0.7, abs=0.01)


def test_two_layers_sharing_one_weight_are_refused_by_name() -> None:
    shared = _model()
    shared[2].weight = shared[0].weight if shared[0].weight.shape == shared[2].weight.shape else shared[2].weight
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model[2].weight = model[0].weight
    before = fingerprint(model)
    with pytest.raises(ValueError, match="tied"):
        ecp_fast.Pruner(model, layers=["0", "2", "4"], progress=False)
    pruner = ecp_fast.Pruner(model, sensitivity="local", progress=False)  # default: the shared pair is left out
    assert set(pruner.layers) == {"4"}
    assert_unchanged(before, model)
